//! The CUDA [`Backend`]: weights, activations and the KV pool in VRAM, every op a kernel of
//! `gpu/kernels/` or a cuBLAS GEMM on the device's compute stream.
//!
//! Activations are f32 (as the CPU reference); matrices are kept in the pack's element type and
//! widened inside the kernels, so bf16 weights cost bf16 bandwidth. Small host-side metadata
//! (token ids, positions, block tables, routing) is uploaded per op.

mod experts;
mod linear;
mod qkv;
mod resident;

pub use resident::{CudaExpertTable, CudaRoutingLog};

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaView, DevicePtrMut, LaunchConfig};
use tileflow_engine::backend::{
    check, AttentionPlan, Backend, BackendError, ExpertRef, ExpertWork, HostMatrix, QkvPrep,
    Routing,
};
use tileflow_engine::dtype::Dtype;
use tileflow_engine::kv::KvLayout;
use tileflow_engine::rope::RopeTable;
use tileflow_engine::sampler::LogitSummary;

use super::device::Kernel;
use super::CudaDevice;

/// The CUDA backend on one GPU.
#[derive(Debug, Clone)]
pub struct CudaBackend {
    pub(crate) dev: Arc<CudaDevice>,
    /// The element type matrices are stored in.
    weight_dtype: Dtype,
    /// Fill every new activation with NaN (tests: an element a kernel forgot shows).
    poison: bool,
    /// Small host metadata uploaded recently, by content: a step's positions, KV slots and
    /// block tables are the same for every layer, so each is uploaded once per step.
    uploads: Arc<Mutex<Vec<Upload>>>,
    /// Columns per warp of the one-token kernels, when forced (see `with_one_row_columns`).
    one_row_columns: Option<u32>,
}

/// Host values and the device buffer they were uploaded to.
type Upload = (Vec<u32>, Uploaded);

/// A buffer of uploaded host values, shared through the upload cache.
pub(crate) type Uploaded = Arc<CudaSlice<u32>>;

/// Recent uploads kept for reuse.
const UPLOAD_CACHE: usize = 16;

/// The most columns a warp of the one-token kernels computes (kernels/common.cuh:
/// `STREAM_LOADS`, one 16-byte load per lane and row in a chunk).
pub(super) const MAX_ONE_ROW_COLUMNS: u32 = 8;

/// Logits one block of `logit_summary` summarises (kernels/logits.cu).
const LOGIT_CHUNK: usize = 4096;

/// Warps per SM the one-token matrix-vector kernels aim for: two blocks of eight.
pub(super) const ONE_ROW_WARPS_PER_SM: usize = 16;

/// A weight in VRAM: matrices in the backend's weight type, vectors (`[1, n]`: norms, biases)
/// in f32.
#[derive(Debug)]
pub struct CudaWeight {
    rows: usize,
    cols: usize,
    dtype: Dtype,
    data: CudaSlice<u8>,
}

/// A row-major f32 activation in VRAM.
#[derive(Debug)]
pub struct CudaAct {
    rows: usize,
    cols: usize,
    data: CudaSlice<f32>,
}

impl CudaAct {
    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Keys and values of every layer in VRAM, `[slots, kv_heads, head_dim]` f32 each.
#[derive(Debug)]
pub struct CudaKvPool {
    layout: KvLayout,
    k: Vec<CudaSlice<f32>>,
    v: Vec<CudaSlice<f32>>,
}

/// The kernels' code for an element type.
pub(crate) fn dtype_code(d: Dtype) -> i32 {
    match d {
        Dtype::F32 => 0,
        Dtype::F16 => 1,
        Dtype::BF16 => 2,
    }
}

pub(crate) fn shape_err(op: &'static str, detail: String) -> BackendError {
    BackendError::Shape { op, detail }
}

/// Maps a driver error of `op` to a [`BackendError`].
pub(crate) fn dev_err<E: std::fmt::Display>(op: &'static str) -> impl Fn(E) -> BackendError {
    move |e| BackendError::Device {
        op,
        reason: e.to_string(),
    }
}

/// A launch of `blocks` blocks of 256 threads for a grid-stride loop over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 8192) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Warps sharing one output column in the matrix-vector kernels (split-K, see
/// `split_reduce` in kernels/common.cuh) for `columns` output columns (all experts' together)
/// of rows of `k`: with few columns too few warps would have loads in flight, so 4 share each
/// where their slices still take whole 8-element vector loads. Measured on the H100: a
/// [2048, 2048] bf16 matrix-vector product at 680 GB/s with one warp per column; the 50304-
/// column output head ran slower split.
pub(crate) fn split_k(k: usize, columns: usize) -> i32 {
    if columns >= 16384 {
        return 1;
    }
    match k {
        k if k % 32 == 0 => 4,
        k if k % 16 == 0 => 2,
        _ => 1,
    }
}

/// Shared memory a block may use without opting in to more.
pub(crate) const STATIC_SMEM: usize = 48 << 10;

/// `count` `what` (rows, columns, experts) as a launch's grid dimension, or a shape error
/// naming them.
pub(crate) fn grid_dim(op: &'static str, count: usize, what: &str) -> Result<u32, BackendError> {
    u32::try_from(count)
        .map_err(|_| shape_err(op, format!("{count} {what}: too many for one launch")))
}

/// `usize` → the kernels' `int`, or a shape error naming `op`.
pub(crate) fn int(op: &'static str, v: usize) -> Result<i32, BackendError> {
    i32::try_from(v).map_err(|_| shape_err(op, format!("{v} does not fit a kernel's int")))
}

pub(crate) fn u32s(op: &'static str, v: &[usize]) -> Result<Vec<u32>, BackendError> {
    v.iter()
        .map(|&x| u32::try_from(x).map_err(|_| shape_err(op, format!("{x} does not fit u32"))))
        .collect()
}

fn same_shape(op: &'static str, a: &CudaAct, b: &CudaAct) -> Result<(), BackendError> {
    check::same_shape(op, (a.rows, a.cols), (b.rows, b.cols))
}

impl CudaBackend {
    /// A backend on `dev` storing matrices as `weight_dtype` (the pack's element type; f32
    /// uploads of bf16 or f16 values convert back exactly).
    pub fn new(dev: Arc<CudaDevice>, weight_dtype: Dtype) -> Result<CudaBackend, BackendError> {
        dev.ctx.bind_to_thread().map_err(dev_err("bind context"))?;
        Ok(CudaBackend {
            dev,
            weight_dtype,
            poison: false,
            uploads: Arc::new(Mutex::new(Vec::new())),
            one_row_columns: None,
        })
    }

    /// The same backend with the one-token matrix-vector kernels computing `columns` (1, 2, 4
    /// or 8; rounded down to one of them) columns per warp wherever their shape allows it,
    /// instead of the number chosen from the matrix and the device (for tests: small shapes
    /// would always get one).
    pub fn with_one_row_columns(mut self, columns: u32) -> CudaBackend {
        let c = columns.clamp(1, MAX_ONE_ROW_COLUMNS);
        self.one_row_columns = Some(1 << (31 - c.leading_zeros()));
        self
    }

    /// Columns per warp for a one-token kernel (a power of two up to `max`): the most that
    /// still gives every SM `per_sm` units of work (warps or blocks, `units(columns)` of them
    /// in all), so that a large matrix reads each lane's x once for more rows and a small one
    /// keeps every SM busy.
    pub(super) fn one_row_columns(
        &self,
        max: u32,
        per_sm: usize,
        units: impl Fn(usize) -> usize,
    ) -> u32 {
        if let Some(c) = self.one_row_columns {
            return c.min(max);
        }
        let want = per_sm * self.dev.info().multiprocessors as usize;
        let mut c = max;
        while c > 1 && units(c as usize) < want {
            c /= 2;
        }
        c
    }

    /// The same backend, filling every new activation with NaN before an op writes it, so a
    /// kernel that leaves an element unwritten is seen (for tests; it costs a memset per op).
    pub fn with_poison(mut self) -> CudaBackend {
        self.poison = true;
        self
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Waits for every op queued so far.
    pub fn synchronize(&self) -> Result<(), BackendError> {
        self.dev
            .compute
            .synchronize()
            .map_err(dev_err("synchronize"))
    }

    /// An uninitialised `[rows, cols]` activation (every kernel writing one writes all of it).
    pub(crate) fn alloc_act(
        &self,
        op: &'static str,
        rows: usize,
        cols: usize,
    ) -> Result<CudaAct, BackendError> {
        let n = rows
            .checked_mul(cols)
            .ok_or_else(|| shape_err(op, "size overflows".into()))?;
        // SAFETY: the buffer is f32 (any bit pattern is valid) and every caller writes all of
        // it before it is read.
        let mut data = unsafe { self.dev.compute.alloc::<f32>(n.max(1)) }.map_err(|_| {
            BackendError::OutOfMemory {
                what: format!("{op}: [{rows}, {cols}] activation"),
            }
        })?;
        if self.poison {
            let s = &self.dev.compute;
            let ptr = data.device_ptr_mut(s).0;
            // SAFETY: `ptr` addresses the n.max(1) floats just allocated; all-ones bytes are a NaN.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xff, n.max(1) * 4, s.cu_stream())
            }
            .map_err(dev_err(op))?;
        }
        Ok(CudaAct { rows, cols, data })
    }

    /// `v` in device memory, uploaded now.
    pub(crate) fn upload_u32(
        &self,
        op: &'static str,
        v: &[u32],
    ) -> Result<CudaSlice<u32>, BackendError> {
        let v: &[u32] = if v.is_empty() { &[0] } else { v };
        self.dev.compute.clone_htod(v).map_err(dev_err(op))
    }

    /// `v` in device memory: the buffer of an earlier upload of the same values when one is
    /// recent, a new upload otherwise. The buffers are never written after their upload.
    pub(crate) fn upload_cached(
        &self,
        op: &'static str,
        v: &[u32],
    ) -> Result<Arc<CudaSlice<u32>>, BackendError> {
        let mut cache = self
            .uploads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(i) = cache.iter().position(|(k, _)| k.as_slice() == v) {
            let hit = cache.remove(i);
            let buf = hit.1.clone();
            cache.insert(0, hit);
            return Ok(buf);
        }
        let buf = Arc::new(self.upload_u32(op, v)?);
        cache.insert(0, (v.to_vec(), buf.clone()));
        cache.truncate(UPLOAD_CACHE);
        Ok(buf)
    }

    /// A step's positions and the rotary table's frequencies (as f32 bits) in device memory,
    /// through the upload cache: the same for every layer of a step.
    pub(crate) fn upload_rope(
        &self,
        op: &'static str,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<(Uploaded, Uploaded), BackendError> {
        let pos = self.upload_cached(op, &u32s(op, positions)?)?;
        let bits: Vec<u32> = table.inv_freq().iter().map(|f| f.to_bits()).collect();
        Ok((pos, self.upload_cached(op, &bits)?))
    }

    /// Checks an RMSNorm's shapes and gives its launch (one block per group) and group width;
    /// `None` when there is nothing to normalise.
    fn norm_plan(
        op: &'static str,
        x: &CudaAct,
        w: &CudaWeight,
    ) -> Result<Option<(LaunchConfig, i32)>, BackendError> {
        let g = w.rows * w.cols;
        check::norm(op, x.cols, g)?;
        if w.dtype != Dtype::F32 {
            return Err(shape_err(
                op,
                format!("a [{}, {}] matrix as the weight", w.rows, w.cols),
            ));
        }
        let groups = x.rows * (x.cols / g);
        if groups == 0 {
            return Ok(None);
        }
        let cfg = LaunchConfig {
            grid_dim: (grid_dim(op, groups, "norm groups")?, 1, 1),
            block_dim: (
                match g {
                    g if g > 4096 => 512,
                    g if g >= 1024 => 256,
                    _ => 128,
                },
                1,
                1,
            ),
            shared_mem_bytes: 0,
        };
        Ok(Some((cfg, int(op, g)?)))
    }
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Act = CudaAct;
    type KvPool = CudaKvPool;
    type ExpertTable = CudaExpertTable;
    type RoutingLog = CudaRoutingLog;

    fn name(&self) -> String {
        self.dev.to_string()
    }

    fn upload(&self, weight: HostMatrix) -> Result<CudaWeight, BackendError> {
        let dtype = if weight.rows == 1 {
            Dtype::F32
        } else {
            self.weight_dtype
        };
        let bytes = dtype.from_f32(&weight.data);
        let data = self
            .dev
            .compute
            .clone_htod(if bytes.is_empty() {
                &[0u8][..]
            } else {
                &bytes[..]
            })
            .map_err(|_| BackendError::OutOfMemory {
                what: format!("[{}, {}] weight", weight.rows, weight.cols),
            })?;
        Ok(CudaWeight {
            rows: weight.rows,
            cols: weight.cols,
            dtype,
            data,
        })
    }

    fn upload_act(&self, act: HostMatrix) -> Result<CudaAct, BackendError> {
        let mut out = self.alloc_act("upload", act.rows, act.cols)?;
        if !act.data.is_empty() {
            self.dev
                .compute
                .memcpy_htod(&act.data, &mut out.data)
                .map_err(dev_err("upload"))?;
        }
        Ok(out)
    }

    fn download(&self, act: &CudaAct) -> Result<HostMatrix, BackendError> {
        let s = &self.dev.compute;
        let mut data = s.clone_dtoh(&act.data).map_err(dev_err("download"))?;
        s.synchronize().map_err(dev_err("download"))?;
        data.truncate(act.rows * act.cols);
        HostMatrix::new(act.rows, act.cols, data)
            .ok_or_else(|| shape_err("download", "short buffer".into()))
    }

    fn alloc_kv(&self, layout: &KvLayout) -> Result<CudaKvPool, BackendError> {
        let n = layout.layer_elements().max(1);
        let s = &self.dev.compute;
        let mut k = Vec::with_capacity(layout.num_layers);
        let mut v = Vec::with_capacity(layout.num_layers);
        let oom = |_| BackendError::OutOfMemory {
            what: format!("KV pool of {n} floats per layer"),
        };
        for _ in 0..layout.num_layers {
            k.push(s.alloc_zeros::<f32>(n).map_err(oom)?);
            v.push(s.alloc_zeros::<f32>(n).map_err(oom)?);
        }
        Ok(CudaKvPool {
            layout: *layout,
            k,
            v,
        })
    }

    fn embed(&self, table: &CudaWeight, ids: &[u32]) -> Result<CudaAct, BackendError> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= table.rows) {
            return Err(BackendError::TokenOutOfRange {
                token: id,
                vocab: table.rows,
            });
        }
        let mut out = self.alloc_act("embed", ids.len(), table.cols)?;
        if ids.is_empty() {
            return Ok(out);
        }
        let d_ids = self.upload_u32("embed", ids)?;
        let (n, cols, dt) = (
            int("embed", ids.len())?,
            int("embed", table.cols)?,
            dtype_code(table.dtype),
        );
        let mut b = self.dev.launch(Kernel::Embed);
        b.arg(&table.data)
            .arg(&dt)
            .arg(&d_ids)
            .arg(&n)
            .arg(&cols)
            .arg(&mut out.data);
        // SAFETY: embed(table, dt, ids, n, cols, out): ids are checked < rows; out is n * cols.
        unsafe { b.launch(elementwise(ids.len() * table.cols)) }.map_err(dev_err("embed"))?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaAct, w: &CudaWeight, eps: f32) -> Result<CudaAct, BackendError> {
        let mut out = self.alloc_act("rms_norm", x.rows, x.cols)?;
        let Some((cfg, g)) = CudaBackend::norm_plan("rms_norm", x, w)? else {
            return Ok(out);
        };
        let mut b = self.dev.launch(Kernel::RmsNorm);
        b.arg(&x.data)
            .arg(&w.data)
            .arg(&g)
            .arg(&eps)
            .arg(&mut out.data);
        // SAFETY: rms_norm(x, w, g, eps, out): x and out hold groups * g floats, w holds g.
        unsafe { b.launch(cfg) }.map_err(dev_err("rms_norm"))?;
        Ok(out)
    }

    fn add_rms_norm(
        &self,
        x: &mut CudaAct,
        delta: &CudaAct,
        w: &CudaWeight,
        eps: f32,
    ) -> Result<CudaAct, BackendError> {
        same_shape("add_rms_norm", x, delta)?;
        let mut out = self.alloc_act("add_rms_norm", x.rows, x.cols)?;
        let Some((cfg, g)) = CudaBackend::norm_plan("add_rms_norm", x, w)? else {
            return Ok(out);
        };
        let mut b = self.dev.launch(Kernel::AddRmsNorm);
        b.arg(&mut x.data)
            .arg(&delta.data)
            .arg(&w.data)
            .arg(&g)
            .arg(&eps)
            .arg(&mut out.data);
        // SAFETY: add_rms_norm(x, delta, w, g, eps, out): x, delta and out hold groups * g
        // floats (same shapes, checked), w holds g.
        unsafe { b.launch(cfg) }.map_err(dev_err("add_rms_norm"))?;
        Ok(out)
    }

    fn linear(
        &self,
        x: &CudaAct,
        w: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaAct, BackendError> {
        linear::linear(self, x, w, bias)
    }

    fn linears(
        &self,
        x: &CudaAct,
        weights: &[(&CudaWeight, Option<&CudaWeight>)],
    ) -> Result<Vec<CudaAct>, BackendError> {
        linear::linears(self, x, weights)
    }

    fn norm_linears(
        &self,
        x: &mut CudaAct,
        delta: Option<&CudaAct>,
        norm: (&CudaWeight, f32),
        weights: &[(&CudaWeight, Option<&CudaWeight>)],
    ) -> Result<(CudaAct, Vec<CudaAct>), BackendError> {
        linear::norm_linears(self, x, delta, norm, weights)
    }

    fn clamp(&self, x: &mut CudaAct, limit: f32) -> Result<(), BackendError> {
        let n = (x.rows * x.cols) as i64;
        if n == 0 {
            return Ok(());
        }
        let mut b = self.dev.launch(Kernel::Clamp);
        b.arg(&mut x.data).arg(&n).arg(&limit);
        // SAFETY: clamp(x, n, limit) over the n floats of x.
        unsafe { b.launch(elementwise(n as usize)) }.map_err(dev_err("clamp"))?;
        Ok(())
    }

    fn rope(
        &self,
        x: &mut CudaAct,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<(), BackendError> {
        let half = table.inv_freq().len();
        if positions.len() != x.rows || half == 0 || !x.cols.is_multiple_of(2 * half) {
            return Err(shape_err(
                "rope",
                format!(
                    "{} positions for {} rows of {} with {} frequencies",
                    positions.len(),
                    x.rows,
                    x.cols,
                    half
                ),
            ));
        }
        if x.rows == 0 {
            return Ok(());
        }
        let (pos, freq) = self.upload_rope("rope", positions, table)?;
        let scale = table.scale();
        let (rows, cols, h) = (
            int("rope", x.rows)?,
            int("rope", x.cols)?,
            int("rope", half)?,
        );
        let mut b = self.dev.launch(Kernel::Rope);
        b.arg(&mut x.data)
            .arg(&*pos)
            .arg(&*freq)
            .arg(&scale)
            .arg(&rows)
            .arg(&cols)
            .arg(&h);
        // SAFETY: rope(x, positions, inv_freq, scale, rows, cols, half): positions has rows
        // entries, inv_freq half (f32 bits), x rows * cols with cols a multiple of 2 * half.
        unsafe { b.launch(elementwise(x.rows * x.cols / 2)) }.map_err(dev_err("rope"))?;
        Ok(())
    }

    fn write_kv(
        &self,
        pool: &mut CudaKvPool,
        layer: usize,
        k: &CudaAct,
        v: &CudaAct,
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
        if slots.is_empty() {
            return Ok(());
        }
        let d_slots = self.upload_cached("write_kv", &u32s("write_kv", slots)?)?;
        let (n, w) = (int("write_kv", slots.len())?, int("write_kv", width)?);
        let (kp, vp) = (&mut pool.k, &mut pool.v);
        let mut b = self.dev.launch(Kernel::WriteKv);
        b.arg(&k.data)
            .arg(&v.data)
            .arg(&*d_slots)
            .arg(&n)
            .arg(&w)
            .arg(&mut kp[layer])
            .arg(&mut vp[layer]);
        // SAFETY: write_kv(k, v, slots, n, width, kpool, vpool): k, v are n * width; every
        // slot is < the pool's slots (checked), each pool holding slots * width floats.
        unsafe { b.launch(elementwise(slots.len() * width)) }.map_err(dev_err("write_kv"))?;
        Ok(())
    }

    fn prepare_attention(
        &self,
        qkv: [CudaAct; 3],
        pool: &mut CudaKvPool,
        p: &QkvPrep<'_, CudaWeight>,
    ) -> Result<CudaAct, BackendError> {
        qkv::prepare_attention(self, qkv, pool, p)
    }

    fn attention(
        &self,
        q: &CudaAct,
        pool: &CudaKvPool,
        layer: usize,
        plan: &AttentionPlan,
    ) -> Result<CudaAct, BackendError> {
        experts::attention(self, q, pool, layer, plan)
    }

    fn route(
        &self,
        logits: &CudaAct,
        top_k: usize,
        renormalize: bool,
    ) -> Result<Routing, BackendError> {
        experts::route(self, logits, top_k, renormalize)
    }

    fn swiglu(&self, gate: &CudaAct, up: &CudaAct) -> Result<CudaAct, BackendError> {
        same_shape("swiglu", gate, up)?;
        let mut out = self.alloc_act("swiglu", gate.rows, gate.cols)?;
        let n = (gate.rows * gate.cols) as i64;
        if n == 0 {
            return Ok(out);
        }
        let mut b = self.dev.launch(Kernel::Swiglu);
        b.arg(&gate.data).arg(&up.data).arg(&mut out.data).arg(&n);
        // SAFETY: swiglu(gate, up, out, n): all three hold n floats.
        unsafe { b.launch(elementwise(n as usize)) }.map_err(dev_err("swiglu"))?;
        Ok(out)
    }

    fn experts(
        &self,
        x: &CudaAct,
        work: &[ExpertWork<'_>],
        out: &mut CudaAct,
    ) -> Result<(), BackendError> {
        experts::experts(self, x, work, out)
    }

    fn expert_table(
        &self,
        experts: &[ExpertRef<'_>],
    ) -> Result<Option<CudaExpertTable>, BackendError> {
        resident::expert_table(self, experts)
    }

    fn routing_log(
        &self,
        entries: usize,
        tokens: usize,
        top_k: usize,
        renormalize: bool,
    ) -> Result<CudaRoutingLog, BackendError> {
        resident::routing_log(self, entries, tokens, top_k, renormalize)
    }

    fn route_experts(
        &self,
        logits: &CudaAct,
        table: &CudaExpertTable,
        x: &CudaAct,
        log: &mut CudaRoutingLog,
        entry: usize,
    ) -> Result<CudaAct, BackendError> {
        resident::route_experts(self, logits, table, x, log, entry)
    }

    fn read_routing_log(&self, log: &CudaRoutingLog) -> Result<Vec<Routing>, BackendError> {
        resident::read_routing_log(self, log)
    }

    fn logit_summaries(
        &self,
        logits: &CudaAct,
    ) -> Result<Option<Vec<Option<LogitSummary>>>, BackendError> {
        const OP: &str = "logit_summaries";
        if logits.rows == 0 || logits.cols == 0 {
            return Ok(None);
        }
        let rows = grid_dim(OP, logits.rows, "logits rows")?;
        let vocab = int(OP, logits.cols)?;
        let chunks = logits.cols.div_ceil(LOGIT_CHUNK);
        let s = &self.dev.compute;
        // SAFETY: f64 (any bit pattern valid); the kernel writes every row's fourth value and,
        // where that is 0, the other three, which are the only ones read.
        let mut out = unsafe { s.alloc::<f64>(4 * logits.rows) }.map_err(dev_err(OP))?;
        // SAFETY: as above; every block writes its four values before the row's last reads them.
        let mut part = unsafe { s.alloc::<f64>(4 * chunks * logits.rows) }.map_err(dev_err(OP))?;
        let mut done = s.alloc_zeros::<u32>(logits.rows).map_err(dev_err(OP))?;
        let chunk = int(OP, LOGIT_CHUNK)?;
        let mut b = self.dev.launch(Kernel::LogitSummary);
        b.arg(&logits.data)
            .arg(&vocab)
            .arg(&chunk)
            .arg(&mut part)
            .arg(&mut done)
            .arg(&mut out);
        let cfg = LaunchConfig {
            grid_dim: (grid_dim(OP, chunks, "vocabulary chunks")?, rows, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: logit_summary(logits, vocab, chunk, part, done, out): logits is rows * vocab
        // floats, the grid ceil(vocab / chunk) blocks per row, part 4 doubles per block, done
        // one zeroed counter per row, out 4 doubles per row.
        unsafe { b.launch(cfg) }.map_err(dev_err(OP))?;
        let host = s.clone_dtoh(&out).map_err(dev_err(OP))?;
        s.synchronize().map_err(dev_err(OP))?;
        Ok(Some(
            host.chunks_exact(4)
                .map(|r| {
                    (r[3] == 0.0).then(|| LogitSummary {
                        argmax: r[0] as u32,
                        max: r[1] as f32,
                        log_sum_exp: r[2],
                    })
                })
                .collect(),
        ))
    }

    fn add_gated(
        &self,
        out: &mut CudaAct,
        y: &CudaAct,
        gate_logit: &CudaAct,
    ) -> Result<(), BackendError> {
        check::add_gated(
            (out.rows, out.cols),
            (y.rows, y.cols),
            (gate_logit.rows, gate_logit.cols),
        )?;
        if out.rows * out.cols == 0 {
            return Ok(());
        }
        let (rows, cols) = (int("add_gated", out.rows)?, int("add_gated", out.cols)?);
        let n = out.rows * out.cols;
        let mut b = self.dev.launch(Kernel::AddGated);
        b.arg(&mut out.data)
            .arg(&y.data)
            .arg(&gate_logit.data)
            .arg(&rows)
            .arg(&cols);
        // SAFETY: add_gated(out, y, g, rows, cols): out and y are rows * cols, g is rows.
        unsafe { b.launch(elementwise(n)) }.map_err(dev_err("add_gated"))?;
        Ok(())
    }

    fn add(&self, x: &mut CudaAct, y: &CudaAct) -> Result<(), BackendError> {
        check::same_shape("add", (x.rows, x.cols), (y.rows, y.cols))?;
        let n = x.rows * x.cols;
        if n == 0 {
            return Ok(());
        }
        // add_bias with one row of all n elements: x[i] += y[i].
        let (one, cols) = (1i32, int("add", n)?);
        let mut l = self.dev.launch(Kernel::AddBias);
        l.arg(&mut x.data).arg(&y.data).arg(&one).arg(&cols);
        // SAFETY: add_bias(x, bias, 1, n): x and y are both n floats (shapes checked).
        unsafe { l.launch(elementwise(n)) }.map_err(dev_err("add"))?;
        Ok(())
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaAct, BackendError> {
        let n = rows.saturating_mul(cols);
        let data = self.dev.compute.alloc_zeros::<f32>(n.max(1)).map_err(|_| {
            BackendError::OutOfMemory {
                what: format!("[{rows}, {cols}] activation"),
            }
        })?;
        Ok(CudaAct { rows, cols, data })
    }

    fn gather_rows(&self, x: &CudaAct, rows: &[usize]) -> Result<CudaAct, BackendError> {
        check::rows_within(rows, x.rows)?;
        let mut out = self.alloc_act("gather_rows", rows.len(), x.cols)?;
        if rows.is_empty() || x.cols == 0 {
            return Ok(out);
        }
        let d_rows = self.upload_u32("gather_rows", &u32s("gather_rows", rows)?)?;
        self.gather(x, &d_rows.as_view(), rows.len(), &mut out)?;
        Ok(out)
    }
}

impl CudaBackend {
    /// `out[i] = x[rows[i]]` for `n` rows already uploaded (and checked).
    pub(crate) fn gather(
        &self,
        x: &CudaAct,
        rows: &CudaView<'_, u32>,
        n: usize,
        out: &mut CudaAct,
    ) -> Result<(), BackendError> {
        let (ni, cols) = (int("gather_rows", n)?, int("gather_rows", x.cols)?);
        let mut b = self.dev.launch(Kernel::GatherRows);
        b.arg(&x.data)
            .arg(rows)
            .arg(&ni)
            .arg(&cols)
            .arg(&mut out.data);
        // SAFETY: gather_rows(x, rows, n, cols, out): rows holds n indices < x.rows, out n * cols.
        unsafe { b.launch(elementwise(n * x.cols)) }.map_err(dev_err("gather_rows"))?;
        Ok(())
    }
}
