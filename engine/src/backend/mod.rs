//! The op set the forward pass is written against, and the host types ops exchange.
//!
//! A backend owns where weights, activations and the KV pool live (host memory for
//! [`cpu::CpuBackend`], VRAM for the CUDA backend) and implements every op the forward pass
//! needs on them. The forward pass ([`crate::forward`]) only sequences ops; everything that
//! touches numbers is here, so a GPU backend is a second implementation of one trait.
//!
//! Metadata that steers an op (token positions, block tables, routing decisions) is passed as
//! small host-side structures; a device backend uploads them per step, as vLLM does.

pub mod check;
pub mod cpu;

use crate::dtype::Dtype;
use crate::kv::KvLayout;
use crate::pack::ProjectionExtent;
use crate::rope::RopeTable;
use crate::sampler::LogitSummary;

/// Why a backend op failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Operands do not fit the op (a bug in the caller, or weights that escaped validation).
    #[error("{op}: {detail}")]
    Shape {
        /// The op.
        op: &'static str,
        /// Which shapes disagreed.
        detail: String,
    },
    /// A token id is outside the embedding table.
    #[error("token id {token} is outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// The token id.
        token: u32,
        /// Rows of the embedding table.
        vocab: usize,
    },
    /// A routed expert's bytes do not hold its projections.
    #[error("expert {expert}: {detail}")]
    ExpertLayout {
        /// The expert index within its layer.
        expert: usize,
        /// What does not fit.
        detail: String,
    },
    /// Device memory or another backend resource ran out.
    #[error("{what}: out of backend memory")]
    OutOfMemory {
        /// What was being allocated.
        what: String,
    },
    /// The device failed an op (a launch, a copy, a library call).
    #[error("{op}: {reason}")]
    Device {
        /// The op.
        op: &'static str,
        /// What the device or its library said.
        reason: String,
    },
}

/// A row-major f32 matrix in host memory: how weights reach a backend and how results leave it.
/// Vectors (norm weights, biases) are `[1, n]`.
#[derive(Clone, PartialEq)]
pub struct HostMatrix {
    /// Rows.
    pub rows: usize,
    /// Columns (the contiguous dimension).
    pub cols: usize,
    /// `rows * cols` values.
    pub data: Vec<f32>,
}

impl std::fmt::Debug for HostMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostMatrix[{}, {}]", self.rows, self.cols)
    }
}

impl HostMatrix {
    /// Wraps `data` as `[rows, cols]`; `None` when the length does not match.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Option<HostMatrix> {
        (rows.checked_mul(cols)? == data.len()).then_some(HostMatrix { rows, cols, data })
    }

    /// A `[rows, cols]` matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> HostMatrix {
        HostMatrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// One row.
    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }

    /// One row, mutable.
    pub fn row_mut(&mut self, r: usize) -> &mut [f32] {
        &mut self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// One chunk of consecutive tokens of one sequence inside a step's attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkAttention {
    /// First row of this chunk in the step's q (and output) matrix.
    pub first_row: usize,
    /// Tokens (rows) of the chunk.
    pub rows: usize,
    /// Position of the chunk's first token; the cache already holds positions `0..start_pos`
    /// and, once [`Backend::write_kv`] ran, the chunk's own.
    pub start_pos: usize,
    /// The sequence's KV blocks, in position order (position `p` is in block
    /// `blocks[p / block_size]` at offset `p % block_size`).
    pub blocks: Vec<u32>,
}

/// Everything attention needs to know about a step besides q and the KV pool.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionPlan {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; `num_heads / num_kv_heads` queries share one (GQA).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Score multiplier (`head_dim^-0.5`).
    pub scale: f32,
    /// Keys at positions `j` with `p - j < window` are visible to a query at `p`; `None` is
    /// plain causal.
    pub sliding_window: Option<usize>,
    /// The chunks, in row order.
    pub chunks: Vec<ChunkAttention>,
}

/// The router's decision for each token of a step: `top_k` experts and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Experts selected per token.
    pub top_k: usize,
    /// `[tokens * top_k]` expert indices, per token in descending weight (ties: lower index).
    pub experts: Vec<u32>,
    /// `[tokens * top_k]` combine weights matching `experts`.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Tokens routed.
    pub fn tokens(&self) -> usize {
        self.experts.len().checked_div(self.top_k).unwrap_or(0)
    }
}

/// Where an expert's extent bytes are: host memory (the CPU backend's tiers, in-memory
/// experts) or device memory (a VRAM slot of the CUDA backend's tier).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertBytes<'a> {
    /// Bytes the host can read.
    Host(&'a [u8]),
    /// `len` bytes of device memory at `ptr`, valid while the borrow lives.
    Device(DeviceExtent<'a>),
}

impl<'a> ExpertBytes<'a> {
    /// Bytes of the extent.
    pub fn len(&self) -> usize {
        match self {
            ExpertBytes::Host(b) => b.len(),
            ExpertBytes::Device(d) => d.len,
        }
    }

    /// Whether the extent is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, when the host can read them.
    pub fn host(&self) -> Option<&'a [u8]> {
        match self {
            ExpertBytes::Host(b) => Some(b),
            ExpertBytes::Device(_) => None,
        }
    }
}

/// A span of device memory borrowed from its owner (a tier slot) for `'a`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceExtent<'a> {
    /// Device address of the first byte.
    pub ptr: u64,
    /// Bytes.
    pub len: usize,
    owner: std::marker::PhantomData<&'a [u8]>,
}

impl<'a> DeviceExtent<'a> {
    /// `len` bytes at `ptr` of memory that `_owner` keeps allocated for `'a`.
    pub fn new<T: ?Sized>(_owner: &'a T, ptr: u64, len: usize) -> DeviceExtent<'a> {
        DeviceExtent {
            ptr,
            len,
            owner: std::marker::PhantomData,
        }
    }
}

/// A routed expert's weights as the storage tiers hold them: the raw bytes of its extent,
/// with the element type and where each projection lies inside.
#[derive(Debug, Clone, Copy)]
pub struct ExpertRef<'a> {
    /// The extent's bytes (at least up to the end of the last projection).
    pub bytes: ExpertBytes<'a>,
    /// Element type of all three projections.
    pub dtype: Dtype,
    /// `gate_proj` / `w1`: `[intermediate, hidden]`.
    pub gate: ProjectionExtent,
    /// `up_proj` / `w3`: `[intermediate, hidden]`.
    pub up: ProjectionExtent,
    /// `down_proj` / `w2`: `[hidden, intermediate]`.
    pub down: ProjectionExtent,
}

/// One expert's share of a step: which rows of the layer input it sees, with which weights.
#[derive(Debug, Clone)]
pub struct ExpertWork<'a> {
    /// The expert's index within its layer (for errors and ordering).
    pub expert: usize,
    /// Its weights.
    pub weights: ExpertRef<'a>,
    /// Rows of the layer input routed to it, ascending.
    pub rows: Vec<usize>,
    /// The combine weight of each of those rows.
    pub scales: Vec<f32>,
}

/// What happens to one layer's q, k and v between their projections and attention, in
/// transformers' order: the q and k RMSNorms (a whole projection or each head wide), the
/// clamp of all three, RoPE of q and k, and the KV cache write of k and v.
#[derive(Debug, Clone, Copy)]
pub struct QkvPrep<'a, W> {
    /// The q norm's weight, if the family has one.
    pub q_norm: Option<&'a W>,
    /// The k norm's weight, if the family has one.
    pub k_norm: Option<&'a W>,
    /// The norms' epsilon.
    pub eps: f32,
    /// Clamp q, k and v to `[-clip, clip]` after the norms (OLMoE's `clip_qkv`).
    pub clip: Option<f32>,
    /// Each row's position.
    pub positions: &'a [usize],
    /// The rotary table.
    pub rope: &'a RopeTable,
    /// The layer whose KV pool the keys and values go to.
    pub layer: usize,
    /// Each row's KV slot.
    pub slots: &'a [usize],
}

impl<'a, W> QkvPrep<'a, W> {
    /// The same preparation with the norm weights of another backend (`f` picks them out of
    /// these: a wrapper over two backends).
    pub fn map<V>(&self, f: impl Fn(&'a W) -> &'a V) -> QkvPrep<'a, V> {
        QkvPrep {
            q_norm: self.q_norm.map(&f),
            k_norm: self.k_norm.map(&f),
            eps: self.eps,
            clip: self.clip,
            positions: self.positions,
            rope: self.rope,
            layer: self.layer,
            slots: self.slots,
        }
    }
}

/// [`Backend::prepare_attention`] as the separate ops (the trait's default, and a device
/// backend's fallback for shapes its fused kernel does not take).
pub fn prepare_attention_ops<B: Backend + ?Sized>(
    b: &B,
    [mut q, mut k, mut v]: [B::Act; 3],
    pool: &mut B::KvPool,
    p: &QkvPrep<'_, B::Weight>,
) -> Result<B::Act, BackendError> {
    if let Some(w) = p.q_norm {
        q = b.rms_norm(&q, w, p.eps)?;
    }
    if let Some(w) = p.k_norm {
        k = b.rms_norm(&k, w, p.eps)?;
    }
    if let Some(c) = p.clip {
        b.clamp(&mut q, c)?;
        b.clamp(&mut k, c)?;
        b.clamp(&mut v, c)?;
    }
    b.rope(&mut q, p.positions, p.rope)?;
    b.rope(&mut k, p.positions, p.rope)?;
    b.write_kv(pool, p.layer, &k, &v, p.slots)?;
    Ok(q)
}

/// What a backend without device-side routing answers when asked for it anyway.
fn no_device_routing(op: &'static str) -> BackendError {
    BackendError::Device {
        op,
        reason: "this backend routes on the host".into(),
    }
}

/// The operations of one forward step, implemented by each compute device.
///
/// Activations are `[tokens, width]` matrices of [`Backend::Act`]; weights are uploaded once
/// as [`Backend::Weight`]; the KV pool is a [`Backend::KvPool`] indexed by the host-side
/// block tables of [`crate::kv::PagedKvCache`].
pub trait Backend: std::fmt::Debug {
    /// A weight matrix resident on the device.
    type Weight: std::fmt::Debug + Send + Sync;
    /// An activation matrix resident on the device.
    type Act: std::fmt::Debug;
    /// Key and value blocks of every layer.
    type KvPool: std::fmt::Debug;
    /// One MoE layer's experts where the backend reaches them without the host (see
    /// [`Backend::expert_table`]).
    type ExpertTable: std::fmt::Debug;
    /// A step's routing decisions kept where they were made (see [`Backend::route_experts`]).
    type RoutingLog: std::fmt::Debug;

    /// A short name for logs ("cpu", "cuda:0").
    fn name(&self) -> String;

    /// Moves a weight onto the device.
    fn upload(&self, weight: HostMatrix) -> Result<Self::Weight, BackendError>;

    /// Moves an activation onto the device.
    fn upload_act(&self, act: HostMatrix) -> Result<Self::Act, BackendError>;

    /// Copies an activation back to the host.
    fn download(&self, act: &Self::Act) -> Result<HostMatrix, BackendError>;

    /// Allocates the KV pool for `layout` (zero-filled).
    fn alloc_kv(&self, layout: &KvLayout) -> Result<Self::KvPool, BackendError>;

    /// `[ids.len(), hidden]`: the rows of `table` (`[vocab, hidden]`) for `ids`.
    fn embed(&self, table: &Self::Weight, ids: &[u32]) -> Result<Self::Act, BackendError>;

    /// RMSNorm of each `weight.len()`-wide group of each row (a whole row, or each head when
    /// the weight is `head_dim` wide): `x * rsqrt(mean(x²) + eps) * weight`, in f32.
    fn rms_norm(
        &self,
        x: &Self::Act,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Act, BackendError>;

    /// `x += delta`, then returns [`Backend::rms_norm`] of the new `x` (the residual add fused
    /// with the next norm).
    fn add_rms_norm(
        &self,
        x: &mut Self::Act,
        delta: &Self::Act,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Act, BackendError>;

    /// `x[m, k] · weight[n, k]ᵀ (+ bias[n])` → `[m, n]`.
    fn linear(
        &self,
        x: &Self::Act,
        weight: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Act, BackendError>;

    /// [`Backend::linear`] of one `x` by each `(weight, bias)` (a layer's q, k and v), in
    /// one launch where the backend can.
    fn linears(
        &self,
        x: &Self::Act,
        weights: &[(&Self::Weight, Option<&Self::Weight>)],
    ) -> Result<Vec<Self::Act>, BackendError> {
        weights.iter().map(|&(w, b)| self.linear(x, w, b)).collect()
    }

    /// `x += delta` (where given), `h` = [`Backend::rms_norm`] of `x` by `norm`, then
    /// [`Backend::linears`] of `h`: returns `h` and the products. The same numbers as the three
    /// ops one after another (the default); a backend may compute the norm inside the
    /// products' launch.
    fn norm_linears(
        &self,
        x: &mut Self::Act,
        delta: Option<&Self::Act>,
        (norm, eps): (&Self::Weight, f32),
        weights: &[(&Self::Weight, Option<&Self::Weight>)],
    ) -> Result<(Self::Act, Vec<Self::Act>), BackendError> {
        let h = match delta {
            Some(d) => self.add_rms_norm(x, d, norm, eps)?,
            None => self.rms_norm(x, norm, eps)?,
        };
        let out = self.linears(&h, weights)?;
        Ok((h, out))
    }

    /// Clamps every element to `[-limit, limit]`.
    fn clamp(&self, x: &mut Self::Act, limit: f32) -> Result<(), BackendError>;

    /// Rotates every `head_dim`-wide head of row `r` for position `positions[r]`.
    fn rope(
        &self,
        x: &mut Self::Act,
        positions: &[usize],
        table: &RopeTable,
    ) -> Result<(), BackendError>;

    /// Stores row `r` of `k` and `v` (`[tokens, kv_heads * head_dim]`) into `layer`'s pool at
    /// slot `slots[r]` (`block * block_size + offset`).
    fn write_kv(
        &self,
        pool: &mut Self::KvPool,
        layer: usize,
        k: &Self::Act,
        v: &Self::Act,
        slots: &[usize],
    ) -> Result<(), BackendError>;

    /// A layer's projected `[q, k, v]` made ready for [`Backend::attention`] as `p` says
    /// (norms, clamp, RoPE, and k and v written to `pool`); returns q. The default runs the
    /// separate ops ([`prepare_attention_ops`]); a device backend may fuse them.
    fn prepare_attention(
        &self,
        qkv: [Self::Act; 3],
        pool: &mut Self::KvPool,
        p: &QkvPrep<'_, Self::Weight>,
    ) -> Result<Self::Act, BackendError> {
        prepare_attention_ops(self, qkv, pool, p)
    }

    /// Causal (optionally sliding-window) GQA attention of `q` (`[tokens, heads * head_dim]`)
    /// over `layer`'s cached keys and values; softmax in f32.
    fn attention(
        &self,
        q: &Self::Act,
        pool: &Self::KvPool,
        layer: usize,
        plan: &AttentionPlan,
    ) -> Result<Self::Act, BackendError>;

    /// Router: softmax over each row of `logits` (f32), top `top_k` (ties to the lower
    /// index), optionally renormalised to sum to one. The decision comes back to the host,
    /// which asks the expert tiers for the selected experts.
    fn route(
        &self,
        logits: &Self::Act,
        top_k: usize,
        renormalize: bool,
    ) -> Result<Routing, BackendError>;

    /// `silu(gate) * up`, elementwise.
    fn swiglu(&self, gate: &Self::Act, up: &Self::Act) -> Result<Self::Act, BackendError>;

    /// For each expert: `out[rows] += scale * down(silu(gate(x[rows])) * up(x[rows]))`.
    /// Contributions reach each row in ascending expert order (as transformers adds them).
    fn experts(
        &self,
        x: &Self::Act,
        work: &[ExpertWork<'_>],
        out: &mut Self::Act,
    ) -> Result<(), BackendError>;

    /// A table of one layer's experts (`experts[e]` is expert `e`) for
    /// [`Backend::route_experts`], when the backend can route to them without the host: the
    /// forward pass builds one per MoE layer once every expert is resident (the provider keeps
    /// their bytes where they are from then on). `None`, the default, keeps routing on the host.
    fn expert_table(
        &self,
        experts: &[ExpertRef<'_>],
    ) -> Result<Option<Self::ExpertTable>, BackendError> {
        let _ = experts;
        Ok(None)
    }

    /// Room for `entries` routings of `tokens` tokens each, `top_k` experts per token,
    /// renormalised or not (a step's MoE layers, for [`Backend::route_experts`]).
    fn routing_log(
        &self,
        entries: usize,
        tokens: usize,
        top_k: usize,
        renormalize: bool,
    ) -> Result<Self::RoutingLog, BackendError> {
        let _ = (entries, tokens, top_k, renormalize);
        Err(no_device_routing("routing_log"))
    }

    /// [`Backend::route`] on `logits`, then [`Backend::experts`] with every selected expert
    /// taken from `table` into a new activation of `x`'s shape (what `experts` would add to
    /// zeros: same sums, in the same order), without the decision leaving the device: it is
    /// kept in `log` as entry `entry` for [`Backend::read_routing_log`].
    fn route_experts(
        &self,
        logits: &Self::Act,
        table: &Self::ExpertTable,
        x: &Self::Act,
        log: &mut Self::RoutingLog,
        entry: usize,
    ) -> Result<Self::Act, BackendError> {
        let _ = (logits, table, x, log, entry);
        Err(no_device_routing("route_experts"))
    }

    /// Every entry of `log`, in entry order (experts are not checked against the layer: an
    /// index out of range means the router saw NaN, and no expert ran for that choice).
    fn read_routing_log(&self, log: &Self::RoutingLog) -> Result<Vec<Routing>, BackendError> {
        let _ = log;
        Err(no_device_routing("read_routing_log"))
    }

    /// Per row of `logits`, its [`LogitSummary`] (argmax and log-sum-exp) where the backend
    /// computes it beside the logits (`None` for a row with a NaN, +∞ or nothing unmasked: the
    /// sampler's own scan names those); `None`, the default, leaves the scan to the sampler.
    fn logit_summaries(
        &self,
        logits: &Self::Act,
    ) -> Result<Option<Vec<Option<LogitSummary>>>, BackendError> {
        let _ = logits;
        Ok(None)
    }

    /// `out += sigmoid(gate_logit) * y`, with `gate_logit` one column per row.
    fn add_gated(
        &self,
        out: &mut Self::Act,
        y: &Self::Act,
        gate_logit: &Self::Act,
    ) -> Result<(), BackendError>;

    /// `x += y`, elementwise (same shapes).
    fn add(&self, x: &mut Self::Act, y: &Self::Act) -> Result<(), BackendError>;

    /// Whether the backend computes in host memory with the host's CPU (then hybrid
    /// execution has nothing to split: see [`crate::tier::CpuExperts::Auto`]).
    fn computes_on_host(&self) -> bool {
        false
    }

    /// A `[rows, cols]` activation of zeros.
    fn zeros(&self, rows: usize, cols: usize) -> Result<Self::Act, BackendError>;

    /// The listed rows of `x`, in the order listed.
    fn gather_rows(&self, x: &Self::Act, rows: &[usize]) -> Result<Self::Act, BackendError>;
}
