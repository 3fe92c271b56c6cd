//! Routed experts: where the forward pass gets them ([`ExpertProvider`]), an in-memory
//! provider, and the MoE block (router → experts → combine, plus Qwen2's shared expert).

use std::collections::{BTreeMap, HashMap};

use super::hybrid::Hybrid;
use super::EngineError;
use crate::backend::{Backend, ExpertBytes, ExpertRef, ExpertWork, HostMatrix, Routing};
use crate::dtype::Dtype;
use crate::kv::SeqId;
use crate::pack::ProjectionExtent;
use crate::spec::MoeSpec;
use crate::weights::{SharedExpertWeights, SwigluWeights};

/// Where the forward pass gets routed experts' weights (the tier cache over `experts.tiles`,
/// or memory in tests).
///
/// Per MoE layer and step, the forward pass calls [`ExpertProvider::prepare`] with the experts
/// the router selected, at most [`ExpertProvider::capacity`] at a time, then
/// [`ExpertProvider::expert`] for each of them. Holding several [`ExpertRef`]s at once (they
/// borrow `&self`) lets a backend compute them together.
pub trait ExpertProvider {
    /// How many experts can be prepared at once (a cache's slot budget).
    fn capacity(&self) -> usize {
        usize::MAX
    }

    /// Makes the listed experts of `layer` (ascending, no repeats, at most
    /// [`ExpertProvider::capacity`]) available: on return, [`ExpertProvider::expert`] must
    /// succeed for each. A caching provider issues or waits on fetches here.
    fn prepare(&mut self, layer: usize, experts: &[usize]) -> Result<(), EngineError>;

    /// The weights of an expert prepared for the current layer.
    fn expert(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, EngineError>;

    /// A hint that the listed experts of `layer` will probably be asked for soon (the
    /// prefetcher's prediction, most likely first). A caching provider starts background
    /// fetches for those not resident, paced so that demand reads go first. Never fails: a hint
    /// that cannot be followed is dropped.
    fn prefetch(&mut self, layer: usize, experts: &[usize]) {
        let _ = (layer, experts);
    }

    /// Whether every expert of the model is resident where the backend computes: then hints
    /// could change nothing, and the forward pass skips the look-ahead routers (and their
    /// device round trips) altogether.
    fn all_resident(&self) -> bool {
        false
    }

    /// Where (layer, expert) is now, without counting a lookup (hybrid execution asks before
    /// choosing where each selected expert runs). The default: where the backend computes.
    fn placement(&self, layer: usize, expert: usize) -> Placement {
        let _ = (layer, expert);
        Placement::Device
    }

    /// Hybrid execution: starts making `device` (ascending, at most
    /// [`ExpertProvider::capacity`]) available where the backend computes, without waiting,
    /// and keeps `host` (experts [`ExpertProvider::placement`] found in the host tier) where
    /// [`ExpertProvider::host_expert`] reads them, until the next call. The default prepares
    /// `device` at once and takes no `host`.
    fn start(&mut self, layer: usize, device: &[usize], host: &[usize]) -> Result<(), EngineError> {
        if let Some(&expert) = host.first() {
            return Err(EngineError::ExpertUnavailable {
                layer,
                expert,
                reason: "this provider has no host tier".into(),
            });
        }
        self.prepare(layer, device)
    }

    /// Waits until `device` experts of the last [`ExpertProvider::start`] are available
    /// through [`ExpertProvider::expert`].
    fn finish(&mut self, layer: usize, device: &[usize]) -> Result<(), EngineError> {
        let _ = (layer, device);
        Ok(())
    }

    /// Bytes of (layer, expert)'s extent, for the hybrid cost model (0 where unknown).
    fn expert_bytes(&self, layer: usize, expert: usize) -> u64 {
        let _ = (layer, expert);
        0
    }

    /// The host-tier bytes of an expert the last [`ExpertProvider::start`] kept for the CPU.
    fn host_expert(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, EngineError> {
        let _ = layer;
        Err(EngineError::ExpertUnavailable {
            layer,
            expert,
            reason: "this provider has no host tier".into(),
        })
    }
}

/// Where a routed expert is when a step asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Where the backend computes (the device tier): ready now.
    Device,
    /// In the host tier only: the CPU can compute it, or it is copied to the device.
    Host,
    /// In neither tier: it must be read from storage.
    Storage,
}

/// One expert's extent held in memory.
#[derive(Debug, Clone)]
struct StoredExpert {
    bytes: Vec<u8>,
    gate: ProjectionExtent,
    up: ProjectionExtent,
    down: ProjectionExtent,
}

/// Routed experts held in memory in the pack's extent layout (gate | up | down, each
/// row-major in `dtype`).
#[derive(Debug, Clone)]
pub struct InMemoryExperts {
    dtype: Dtype,
    experts: HashMap<(usize, usize), StoredExpert>,
    prepared: usize,
}

impl InMemoryExperts {
    /// No experts yet; all will be stored as `dtype`.
    pub fn new(dtype: Dtype) -> InMemoryExperts {
        InMemoryExperts {
            dtype,
            experts: HashMap::new(),
            prepared: 0,
        }
    }

    /// Stores (layer, expert) from its f32 projections: gate and up `[intermediate, hidden]`,
    /// down `[hidden, intermediate]`.
    pub fn insert(
        &mut self,
        layer: usize,
        expert: usize,
        gate: &HostMatrix,
        up: &HostMatrix,
        down: &HostMatrix,
    ) {
        let mut bytes = Vec::new();
        let mut extent = |m: &HostMatrix| {
            let offset = bytes.len() as u64;
            bytes.extend_from_slice(&self.dtype.from_f32(&m.data));
            ProjectionExtent {
                offset,
                shape: [m.rows, m.cols],
            }
        };
        let (gate, up, down) = (extent(gate), extent(up), extent(down));
        self.experts.insert(
            (layer, expert),
            StoredExpert {
                bytes,
                gate,
                up,
                down,
            },
        );
    }

    /// Experts handed to [`ExpertProvider::prepare`] so far, counted with repeats.
    pub fn prepared_count(&self) -> usize {
        self.prepared
    }
}

impl ExpertProvider for InMemoryExperts {
    fn prepare(&mut self, layer: usize, experts: &[usize]) -> Result<(), EngineError> {
        if let Some(&expert) = experts
            .iter()
            .find(|&&e| !self.experts.contains_key(&(layer, e)))
        {
            return Err(EngineError::ExpertUnavailable {
                layer,
                expert,
                reason: "not in memory".into(),
            });
        }
        self.prepared += experts.len();
        Ok(())
    }

    fn expert(&self, layer: usize, expert: usize) -> Result<ExpertRef<'_>, EngineError> {
        let e =
            self.experts
                .get(&(layer, expert))
                .ok_or_else(|| EngineError::ExpertUnavailable {
                    layer,
                    expert,
                    reason: "not in memory".into(),
                })?;
        Ok(ExpertRef {
            bytes: ExpertBytes::Host(&e.bytes),
            dtype: self.dtype,
            gate: e.gate,
            up: e.up,
            down: e.down,
        })
    }
}

/// `down(silu(gate(h)) * up(h))`.
pub(super) fn swiglu_mlp<B: Backend>(
    backend: &B,
    h: &B::Act,
    w: &SwigluWeights<B::Weight>,
    layer: usize,
) -> Result<B::Act, EngineError> {
    let err = EngineError::at(layer, "mlp");
    let g = backend.linear(h, &w.gate, None).map_err(err)?;
    let u = backend.linear(h, &w.up, None).map_err(err)?;
    let a = backend.swiglu(&g, &u).map_err(err)?;
    backend.linear(&a, &w.down, None).map_err(err)
}

/// One selected expert with the token rows it gets and their combine weights.
pub(super) type ExpertGroup = (usize, (Vec<usize>, Vec<f32>));

/// The token rows and combine weights each selected expert gets, by ascending expert.
fn group_by_expert(routing: &Routing) -> BTreeMap<usize, (Vec<usize>, Vec<f32>)> {
    let mut groups: BTreeMap<usize, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
    let k = routing.top_k;
    for (i, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
        let g = groups.entry(e as usize).or_default();
        g.0.push(i / k);
        g.1.push(w);
    }
    groups
}

/// Layer `layer`'s router on the post-attention-normed `h`: softmax, top-k and optional
/// renormalisation. An expert index outside the layer is an [`EngineError::ExpertUnavailable`].
pub(super) fn route<B: Backend>(
    backend: &B,
    moe: &MoeSpec,
    layer: usize,
    h: &B::Act,
    router: &B::Weight,
) -> Result<Routing, EngineError> {
    let err = EngineError::at(layer, "router");
    let logits = backend.linear(h, router, None).map_err(err)?;
    let routing = backend
        .route(&logits, moe.top_k, moe.norm_topk_prob)
        .map_err(err)?;
    check_routing(moe, layer, &routing)?;
    Ok(routing)
}

/// An expert index outside the layer is an [`EngineError::ExpertUnavailable`].
pub(super) fn check_routing(
    moe: &MoeSpec,
    layer: usize,
    routing: &Routing,
) -> Result<(), EngineError> {
    if let Some(&bad) = routing
        .experts
        .iter()
        .find(|&&e| e as usize >= moe.num_experts)
    {
        return Err(EngineError::ExpertUnavailable {
            layer,
            expert: bad as usize,
            reason: format!("the router chose it but the layer has {}", moe.num_experts),
        });
    }
    Ok(())
}

/// A MoE layer whose experts are all on the device: its router, their table, its shared expert.
pub(super) struct DeviceMoe<'a, B: Backend> {
    pub(super) router: &'a B::Weight,
    pub(super) table: &'a B::ExpertTable,
    pub(super) shared: Option<&'a SharedExpertWeights<B::Weight>>,
}

/// The MoE block of `layer` routed on the device, on the residual stream `x` after adding
/// `attn` and norming it (the post-attention norm, fused with the router's product): router,
/// then every selected expert from the table, the decision kept in `log` at its entry; plus
/// the gated shared expert.
pub(super) fn moe_on_device<B: Backend>(
    backend: &B,
    layer: usize,
    (x, attn, norm): (&mut B::Act, &B::Act, (&B::Weight, f32)),
    moe: &DeviceMoe<'_, B>,
    (log, entry): (&mut B::RoutingLog, usize),
) -> Result<B::Act, EngineError> {
    let err = EngineError::at(layer, "router");
    let (h, logits) = backend
        .norm_linears(x, Some(attn), norm, &[(moe.router, None)])
        .map_err(err)?;
    let logits = logits.into_iter().next().ok_or_else(|| {
        err(crate::backend::BackendError::Shape {
            op: "norm_linears",
            detail: "no result for the router".into(),
        })
    })?;
    let mut out = backend
        .route_experts(&logits, moe.table, &h, log, entry)
        .map_err(EngineError::at(layer, "experts"))?;
    add_shared(backend, layer, &h, moe.shared, &mut out)?;
    Ok(out)
}

/// `out += sigmoid(gate·h) * shared(h)` where the layer has a shared expert.
pub(super) fn add_shared<B: Backend>(
    backend: &B,
    layer: usize,
    h: &B::Act,
    shared: Option<&SharedExpertWeights<B::Weight>>,
    out: &mut B::Act,
) -> Result<(), EngineError> {
    if let Some(s) = shared {
        let y = swiglu_mlp(backend, h, &s.mlp, layer)?;
        let err = EngineError::at(layer, "shared expert");
        let g = backend.linear(h, &s.gate, None).map_err(err)?;
        backend.add_gated(out, &y, &g).map_err(err)?;
    }
    Ok(())
}

/// The experts `routing` selects for any token, ascending.
pub(super) fn chosen_experts(routing: &Routing) -> Vec<usize> {
    let mut chosen: Vec<usize> = routing.experts.iter().map(|&e| e as usize).collect();
    chosen.sort_unstable();
    chosen.dedup();
    chosen
}

/// The rest of the MoE block of `layer` after its router: the routed experts from `experts`
/// combined by `routing`'s weights, and the gated shared expert where there is one.
///
/// An expert failure becomes [`EngineError::RoutedExpert`] naming the sequences (from
/// `row_seqs`, the sequence of each row of `h`) whose tokens were routed to that expert.
#[allow(clippy::too_many_arguments)]
pub(super) fn moe_experts<B: Backend, P: ExpertProvider>(
    backend: &B,
    experts: &mut P,
    layer: usize,
    h: &B::Act,
    routing: &Routing,
    mut hints: Vec<(usize, Vec<usize>)>,
    shared: Option<&SharedExpertWeights<B::Weight>>,
    (rows, hidden): (usize, usize),
    row_seqs: &[SeqId],
    hybrid: &mut Hybrid,
) -> Result<B::Act, EngineError> {
    let groups: Vec<_> = group_by_expert(routing).into_iter().collect();
    let bytes = |e: usize| experts.expert_bytes(layer, e);
    if let Some(cpu) = hybrid.plan(backend, experts, layer, &groups, bytes) {
        let sizes: Vec<(usize, u64)> = groups.iter().map(|g| (g.0, bytes(g.0))).collect();
        let bytes = |e: usize| sizes.iter().find(|s| s.0 == e).map_or(0, |s| s.1);
        return hybrid
            .run(
                backend,
                experts,
                layer,
                h,
                (&groups, &cpu),
                hints,
                shared,
                bytes,
            )
            .map_err(|e| blame(e, &groups, row_seqs));
    }
    let err = EngineError::at(layer, "experts");
    let mut out = backend.zeros(rows, hidden).map_err(err)?;
    // Experts go in ascending order, as many at a time as the provider can hold; the sum
    // per token is the same whatever the budget.
    for batch in groups.chunks(experts.capacity().max(1)) {
        let blame = |e: EngineError| blame(e, batch, row_seqs);
        let selected: Vec<usize> = batch.iter().map(|(e, _)| *e).collect();
        experts.prepare(layer, &selected).map_err(blame)?;
        // The look-ahead hints go out once this layer's first experts are in: on a storage
        // queue that serves reads in order, hints given earlier would sit ahead of this
        // layer's demand reads; given now, their reads overlap this layer's compute.
        for (next, predicted) in hints.drain(..) {
            experts.prefetch(next, &predicted);
        }
        let work = batch
            .iter()
            .map(|(expert, (rows, scales))| {
                Ok(ExpertWork {
                    expert: *expert,
                    weights: experts.expert(layer, *expert).map_err(blame)?,
                    rows: rows.clone(),
                    scales: scales.clone(),
                })
            })
            .collect::<Result<Vec<_>, EngineError>>()?;
        backend.experts(h, &work, &mut out).map_err(err)?;
    }
    add_shared(backend, layer, h, shared, &mut out)?;
    Ok(out)
}

/// Wraps an expert failure in [`EngineError::RoutedExpert`] with the sequences routed to the
/// failed expert (to every expert of `batch` when the error names none of them). Other
/// errors concern the whole step and pass unchanged.
fn blame(e: EngineError, batch: &[ExpertGroup], row_seqs: &[SeqId]) -> EngineError {
    let Some((_, expert)) = e.expert() else {
        return e;
    };
    if matches!(e, EngineError::RoutedExpert { .. }) {
        return e;
    }
    let rows: Vec<usize> = match batch.iter().find(|(x, _)| *x == expert) {
        Some((_, (rows, _))) => rows.clone(),
        None => batch
            .iter()
            .flat_map(|(_, (rows, _))| rows.clone())
            .collect(),
    };
    routed_expert_error(e, &rows, row_seqs)
}

/// [`EngineError::RoutedExpert`] over `e` for the sequences of `rows`.
pub(super) fn routed_expert_error(
    e: EngineError,
    rows: &[usize],
    row_seqs: &[SeqId],
) -> EngineError {
    let mut seqs: Vec<SeqId> = rows
        .iter()
        .filter_map(|&r| row_seqs.get(r).copied())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    EngineError::RoutedExpert {
        seqs,
        source: Box::new(e),
    }
}
