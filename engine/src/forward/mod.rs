//! The batched forward pass: [`ModelRunner::step`] runs any mix of prefill chunks and decode
//! tokens of many sequences through the model in one pass, over a [`Backend`], a paged KV
//! cache and an [`ExpertProvider`], with transformers' float32 semantics.
//!
//! Per decoder layer (as transformers' Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE modules):
//! `h = input_norm(x)`; q, k, v projections (+bias); OLMoE: RMSNorm over the whole q and k,
//! then clamp q, k, v to ±clip_qkv; Qwen3: RMSNorm per head of q and k; RoPE on q and k;
//! causal GQA attention (sliding window where the layer has one) scaled by `head_dim^-0.5`;
//! `x += o_proj(attn)`; `h = post_attention_norm(x)`; MoE (softmax over all experts → top-k →
//! optional renormalisation → Σ wₑ·expertₑ(h), plus `sigmoid(gate·h)·shared(h)` for Qwen2) or a
//! dense SwiGLU MLP; `x += mlp`. Finally `norm(x) · lm_headᵀ` (the embedding when tied).

mod attention;
mod error;
mod hybrid;
mod moe;
mod prefetch;
#[cfg(test)]
mod tests;

pub use error::EngineError;
pub use hybrid::{CostModel, Hybrid};
pub use moe::{ExpertProvider, InMemoryExperts, Placement};
pub use prefetch::{PredictionCounts, PrefetchStats};

use crate::backend::{AttentionPlan, Backend, ChunkAttention, HostMatrix};
use crate::kv::{KvLayout, PagedKvCache, SeqId};
use crate::rope::RopeTable;
use crate::sampler::LogitSummary;
use crate::spec::ModelSpec;
use crate::weights::{DenseWeights, MlpWeights, TensorLoader};

/// Which logits a chunk wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitRows {
    /// None (a prefill chunk that is not the prompt's last).
    None,
    /// The chunk's last token (the next-token distribution).
    #[default]
    Last,
    /// Every token of the chunk (prompt logprobs).
    All,
}

/// Consecutive tokens of one sequence to run in a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqChunk<'a> {
    /// The sequence.
    pub seq: SeqId,
    /// Its next tokens.
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`: at most the sequence's cached length. Less rewinds the
    /// sequence, dropping what was cached from there on.
    pub start_pos: usize,
    /// Which logits to return.
    pub logits: LogitRows,
}

impl<'a> SeqChunk<'a> {
    /// A chunk that wants the logits of its last token.
    pub fn new(seq: SeqId, tokens: &'a [u32], start_pos: usize) -> SeqChunk<'a> {
        SeqChunk {
            seq,
            tokens,
            start_pos,
            logits: LogitRows::Last,
        }
    }
}

/// Size of the paged KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheConfig {
    /// Blocks in the pool (shared by all sequences).
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
}

impl Default for KvCacheConfig {
    fn default() -> KvCacheConfig {
        KvCacheConfig {
            num_blocks: 256,
            block_size: 16,
        }
    }
}

/// A loaded model on one backend: dense weights, the KV cache, and the expert source.
#[derive(Debug)]
pub struct ModelRunner<B: Backend, P> {
    spec: ModelSpec,
    backend: B,
    weights: DenseWeights<B::Weight>,
    experts: P,
    rope: RopeTable,
    kv: PagedKvCache,
    pool: B::KvPool,
    prefetch: prefetch::Prefetcher,
    /// Per layer, its expert table for device-side routing (MoE layers), built once every
    /// expert is resident: `None` until then (or since residency ended), empty when the
    /// backend routes on the host anyway.
    tables: Option<Vec<Option<B::ExpertTable>>>,
    /// Per chunk of the last step, its logits' summary when the backend computed it and the
    /// chunk asked for one row (see [`ModelRunner::logit_summaries`]).
    summaries: Vec<Option<LogitSummary>>,
    /// Hybrid execution of device-tier misses on the CPU.
    hybrid: Hybrid,
}

/// The per-step layout of the batch: flattened tokens and where each chunk lies.
struct StepLayout {
    ids: Vec<u32>,
    positions: Vec<usize>,
    slots: Vec<usize>,
    /// The sequence of each row.
    row_seqs: Vec<SeqId>,
    /// Attention's view of the batch; each layer sets its own sliding window.
    plan: AttentionPlan,
}

impl<B: Backend, P: ExpertProvider> ModelRunner<B, P> {
    /// Uploads `weights` (as loaded for `spec`) onto `backend` and allocates the KV pool.
    pub fn new(
        spec: ModelSpec,
        backend: B,
        weights: DenseWeights<HostMatrix>,
        experts: P,
        cache: KvCacheConfig,
    ) -> Result<ModelRunner<B, P>, EngineError> {
        if weights.layers.len() != spec.num_layers() || weights.family != spec.family {
            return Err(EngineError::Config {
                reason: format!(
                    "weights of {} {:?} layers for a {} {:?}-layer spec",
                    weights.layers.len(),
                    weights.family,
                    spec.num_layers(),
                    spec.family
                ),
            });
        }
        let layout = KvLayout {
            num_layers: spec.num_layers(),
            num_blocks: cache.num_blocks,
            block_size: cache.block_size,
            num_kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
        };
        let kv = PagedKvCache::new(layout)?;
        let pool = backend
            .alloc_kv(&layout)
            .map_err(EngineError::op("KV pool allocation"))?;
        let weights = weights.upload(&backend)?;
        Ok(ModelRunner {
            rope: spec.rope.table(),
            prefetch: prefetch::Prefetcher::new(spec.num_layers()),
            spec,
            backend,
            weights,
            experts,
            kv,
            pool,
            tables: None,
            summaries: Vec::new(),
            hybrid: Hybrid::default(),
        })
    }

    /// Reads the dense weights `spec` needs from `loader`, then as [`ModelRunner::new`].
    pub fn load<L: TensorLoader>(
        spec: ModelSpec,
        backend: B,
        loader: &mut L,
        experts: P,
        cache: KvCacheConfig,
    ) -> Result<ModelRunner<B, P>, EngineError> {
        let weights = DenseWeights::load(&spec, loader)?;
        ModelRunner::new(spec, backend, weights, experts, cache)
    }

    /// The model's spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The expert provider.
    pub fn experts(&self) -> &P {
        &self.experts
    }

    /// The expert provider, mutable (to tune or inspect a cache between steps).
    pub fn experts_mut(&mut self) -> &mut P {
        &mut self.experts
    }

    /// Sets the router look-ahead depth: after each MoE layer's router, the next `depth` MoE
    /// layers' routers predict their experts and the provider gets [`ExpertProvider::prefetch`]
    /// hints. 0 turns prefetching off (no extra router GEMMs, no hints, no counting).
    pub fn set_prefetch_depth(&mut self, depth: usize) {
        self.prefetch.set_depth(depth);
    }

    /// Hybrid execution: which device-tier misses the CPU computes from the host tier.
    pub fn set_cpu_experts(&mut self, mode: crate::tier::CpuExperts) {
        self.hybrid = Hybrid::new(mode);
    }

    /// As [`ModelRunner::set_cpu_experts`], by value.
    pub fn with_cpu_experts(mut self, mode: crate::tier::CpuExperts) -> Self {
        self.set_cpu_experts(mode);
        self
    }

    /// Hybrid execution's mode and cost model.
    pub fn hybrid(&self) -> &Hybrid {
        &self.hybrid
    }

    /// As [`ModelRunner::set_prefetch_depth`], by value.
    pub fn with_prefetch_depth(mut self, depth: usize) -> Self {
        self.set_prefetch_depth(depth);
        self
    }

    /// The router look-ahead depth (0: off).
    pub fn prefetch_depth(&self) -> usize {
        self.prefetch.depth()
    }

    /// How well router look-ahead predicted the routers since load or the last reset.
    pub fn prefetch_stats(&self) -> PrefetchStats {
        self.prefetch.stats()
    }

    /// Zeroes [`ModelRunner::prefetch_stats`].
    pub fn reset_prefetch_stats(&mut self) {
        self.prefetch.reset_stats();
    }

    /// The KV cache's bookkeeping.
    pub fn kv_cache(&self) -> &PagedKvCache {
        &self.kv
    }

    /// Registers a new, empty sequence.
    pub fn add_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        Ok(self.kv.add_sequence(seq)?)
    }

    /// Drops a sequence and frees its KV blocks.
    pub fn free_sequence(&mut self, seq: SeqId) -> Result<(), EngineError> {
        self.kv
            .free_sequence(seq)
            .map_err(|_| EngineError::UnknownSequence { seq })?;
        Ok(())
    }

    /// Tokens cached for `seq`.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize, EngineError> {
        self.kv
            .len(seq)
            .map_err(|_| EngineError::UnknownSequence { seq })
    }

    /// Runs every chunk of `batch` through the model, caching their keys and values.
    /// Returns, per chunk, the logits it asked for: `rows * vocab` values (row-major).
    ///
    /// On error, each sequence of the batch keeps its first `start_pos` tokens cached.
    pub fn step(&mut self, batch: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, EngineError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.validate(batch)?;
        let resize: Vec<(SeqId, usize)> = batch
            .iter()
            .map(|c| (c.seq, c.start_pos + c.tokens.len()))
            .collect();
        self.kv.resize(&resize)?;
        self.summaries.clear();
        match self.run(batch) {
            Ok((logits, summaries)) => {
                self.summaries = summaries;
                Ok(logits)
            }
            Err(e) => {
                let rewind: Vec<(SeqId, usize)> =
                    batch.iter().map(|c| (c.seq, c.start_pos)).collect();
                // Shrinking only gives blocks back, so this cannot fail.
                let _ = self.kv.resize(&rewind);
                Err(e)
            }
        }
    }

    /// Per chunk of the last successful step, the summary of its logits (argmax and
    /// log-sum-exp, for [`crate::sampler::Sampler::sample_with`]) when the backend computed
    /// it and the chunk asked for one row; empty after a failed step.
    pub fn logit_summaries(&self) -> &[Option<LogitSummary>] {
        &self.summaries
    }

    fn validate(&self, batch: &[SeqChunk<'_>]) -> Result<(), EngineError> {
        let mut seen = std::collections::HashSet::new();
        for c in batch {
            if !seen.insert(c.seq) {
                return Err(EngineError::DuplicateSequence { seq: c.seq });
            }
            let cached = self.seq_len(c.seq)?;
            if c.tokens.is_empty() {
                return Err(EngineError::EmptyChunk { seq: c.seq });
            }
            if c.start_pos > cached {
                return Err(EngineError::PositionGap {
                    seq: c.seq,
                    start_pos: c.start_pos,
                    cached,
                });
            }
            let vocab = self.spec.vocab_size;
            if let Some(&token) = c.tokens.iter().find(|&&t| t as usize >= vocab) {
                return Err(EngineError::TokenOutOfRange {
                    seq: c.seq,
                    token,
                    vocab,
                });
            }
        }
        Ok(())
    }

    fn layout(&self, batch: &[SeqChunk<'_>]) -> Result<StepLayout, EngineError> {
        let total: usize = batch.iter().map(|c| c.tokens.len()).sum();
        let spec = &self.spec;
        let mut l = StepLayout {
            ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            slots: Vec::with_capacity(total),
            row_seqs: Vec::with_capacity(total),
            plan: AttentionPlan {
                num_heads: spec.num_heads,
                num_kv_heads: spec.num_kv_heads,
                head_dim: spec.head_dim,
                scale: (spec.head_dim as f64).powf(-0.5) as f32,
                sliding_window: None,
                chunks: Vec::with_capacity(batch.len()),
            },
        };
        for c in batch {
            l.plan.chunks.push(ChunkAttention {
                first_row: l.ids.len(),
                rows: c.tokens.len(),
                start_pos: c.start_pos,
                blocks: self.kv.blocks(c.seq)?.to_vec(),
            });
            l.ids.extend_from_slice(c.tokens);
            l.row_seqs
                .extend(std::iter::repeat_n(c.seq, c.tokens.len()));
            for p in c.start_pos..c.start_pos + c.tokens.len() {
                l.positions.push(p);
                l.slots.push(self.kv.slot(c.seq, p)?);
            }
        }
        Ok(l)
    }

    /// Builds the expert tables once every expert is resident (and drops them when that
    /// stops), so routing stays on the device; a backend that cannot gives none.
    fn refresh_tables(&mut self) -> Result<(), EngineError> {
        if !self.experts.all_resident() {
            self.tables = None;
            return Ok(());
        }
        if self.tables.is_some() {
            return Ok(());
        }
        let mut tables = Vec::with_capacity(self.weights.layers.len());
        for (i, l) in self.weights.layers.iter().enumerate() {
            if !matches!(l.mlp, MlpWeights::Moe { .. }) {
                tables.push(None);
                continue;
            }
            let refs = (0..self.spec.moe.num_experts)
                .map(|e| self.experts.expert(i, e))
                .collect::<Result<Vec<_>, _>>()?;
            match self
                .backend
                .expert_table(&refs)
                .map_err(EngineError::at(i, "expert table"))?
            {
                Some(t) => tables.push(Some(t)),
                None => {
                    tables.clear();
                    break;
                }
            }
        }
        self.tables = Some(tables);
        Ok(())
    }

    fn run(&mut self, batch: &[SeqChunk<'_>]) -> Result<ChunkLogits, EngineError> {
        let mut step = self.layout(batch)?;
        self.refresh_tables()?;
        let ModelRunner {
            spec,
            backend: b,
            weights: w,
            experts,
            rope,
            pool,
            prefetch,
            tables,
            hybrid,
            ..
        } = self;
        let eps = spec.rms_norm_eps;
        let moe_layers: Vec<usize> = w
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l.mlp, MlpWeights::Moe { .. }))
            .map(|(i, _)| i)
            .collect();
        prefetch.start_step(&moe_layers, experts);
        // With every expert's table on the device, routing stays there until the step ends.
        let mut log = if tables
            .as_ref()
            .is_none_or(|t| t.iter().all(Option::is_none))
        {
            None
        } else {
            let tokens = step.ids.len();
            Some((
                b.routing_log(
                    moe_layers.len(),
                    tokens,
                    spec.moe.top_k,
                    spec.moe.norm_topk_prob,
                )
                .map_err(EngineError::op("routing log"))?,
                Vec::with_capacity(moe_layers.len()),
            ))
        };
        let mut x = b
            .embed(&w.embed, &step.ids)
            .map_err(EngineError::op("embed"))?;
        // The last layer's MLP output, not yet added to the residual stream x: the next op that
        // reads the normed stream adds it (fused with the norm, and where the backend can, with
        // the products that follow).
        let mut pending: Option<B::Act> = None;
        for (i, lw) in w.layers.iter().enumerate() {
            let layer = attention::LayerContext {
                backend: b,
                spec,
                rope,
                layer: i,
                weights: &lw.attn,
            };
            step.plan.sliding_window = spec.layers[i].sliding_window;
            let input = (&mut x, pending.take(), &lw.input_norm);
            let attn = layer.run(input, pool, &step.positions, &step.slots, &step.plan)?;
            let on_device = tables
                .as_ref()
                .and_then(|t| t.get(i))
                .and_then(Option::as_ref);
            let post_norm = (&lw.post_attention_norm, eps);
            let mlp = match (&lw.mlp, on_device, log.as_mut()) {
                (MlpWeights::Moe { router, shared }, Some(table), Some((log, routed))) => {
                    routed.push(i);
                    let entry = routed.len() - 1;
                    let moe = moe::DeviceMoe {
                        router,
                        table,
                        shared: shared.as_ref(),
                    };
                    moe::moe_on_device(b, i, (&mut x, &attn, post_norm), &moe, (log, entry))?
                }
                (MlpWeights::Dense(m), _, _) => {
                    let h2 = b
                        .add_rms_norm(&mut x, &attn, post_norm.0, eps)
                        .map_err(EngineError::at(i, "post-attention norm"))?;
                    moe::swiglu_mlp(b, &h2, m, i)?
                }
                (MlpWeights::Moe { router, shared }, _, _) => {
                    let h2 = b
                        .add_rms_norm(&mut x, &attn, post_norm.0, eps)
                        .map_err(EngineError::at(i, "post-attention norm"))?;
                    let routing = moe::route(b, &spec.moe, i, &h2, router)?;
                    prefetch.routed(i, &moe::chosen_experts(&routing));
                    let next =
                        w.layers
                            .iter()
                            .enumerate()
                            .skip(i + 1)
                            .filter_map(|(j, l)| match &l.mlp {
                                MlpWeights::Moe { router, .. } => Some((j, router)),
                                MlpWeights::Dense(_) => None,
                            });
                    let hints = if experts.all_resident() {
                        Vec::new()
                    } else {
                        prefetch.look_ahead(b, &spec.moe, &h2, next)
                    };
                    moe::moe_experts(
                        b,
                        experts,
                        i,
                        &h2,
                        &routing,
                        hints,
                        shared.as_ref(),
                        (step.ids.len(), spec.hidden_size),
                        &step.row_seqs,
                        hybrid,
                    )?
                }
            };
            pending = Some(mlp);
        }
        let h = match &pending {
            Some(mlp) => b.add_rms_norm(&mut x, mlp, &w.final_norm, eps),
            None => b.rms_norm(&x, &w.final_norm, eps),
        }
        .map_err(EngineError::op("final norm"))?;
        let logits = self.logits(batch, &step, &h)?;
        if let Some((log, routed)) = log {
            self.account_routing(&log, &routed)?;
        }
        Ok(logits)
    }

    /// After a step routed on the device: reads the decisions back (one copy) and tells the
    /// prefetcher and the provider what each layer chose, as a host-routed step does as it
    /// goes (so hit counters and prefetch history stay true). A choice outside the layer
    /// (a NaN router) fails the step here.
    fn account_routing(
        &mut self,
        log: &B::RoutingLog,
        layers: &[usize],
    ) -> Result<(), EngineError> {
        let routings = self
            .backend
            .read_routing_log(log)
            .map_err(EngineError::op("routing log"))?;
        for (&layer, routing) in layers.iter().zip(&routings) {
            moe::check_routing(&self.spec.moe, layer, routing)?;
            let chosen = moe::chosen_experts(routing);
            self.prefetch.routed(layer, &chosen);
            self.experts.prepare(layer, &chosen)?;
        }
        Ok(())
    }

    /// The logits each chunk asked for, from the final-normed hidden state, and per chunk the
    /// backend's summary of them when it made one and the chunk asked for one row.
    fn logits(
        &self,
        batch: &[SeqChunk<'_>],
        step: &StepLayout,
        h: &B::Act,
    ) -> Result<ChunkLogits, EngineError> {
        let mut rows = Vec::new();
        let mut counts = Vec::with_capacity(batch.len());
        for (c, ch) in batch.iter().zip(&step.plan.chunks) {
            let before = rows.len();
            match c.logits {
                LogitRows::None => {}
                LogitRows::Last => rows.push(ch.first_row + ch.rows - 1),
                LogitRows::All => rows.extend(ch.first_row..ch.first_row + ch.rows),
            }
            counts.push(rows.len() - before);
        }
        if rows.is_empty() {
            return Ok((vec![Vec::new(); batch.len()], vec![None; batch.len()]));
        }
        let b = &self.backend;
        let sel = b.gather_rows(h, &rows).map_err(EngineError::op("logits"))?;
        let logits = b
            .linear(&sel, self.weights.output_projection(), None)
            .map_err(EngineError::op("logits"))?;
        let row_sums = b
            .logit_summaries(&logits)
            .map_err(EngineError::op("logits"))?;
        let host = b.download(&logits).map_err(EngineError::op("logits"))?;
        let vocab = host.cols;
        let mut out = Vec::with_capacity(batch.len());
        let mut sums = Vec::with_capacity(batch.len());
        let mut at = 0;
        for n in counts {
            out.push(host.data[at * vocab..(at + n) * vocab].to_vec());
            sums.push(match &row_sums {
                Some(r) if n == 1 => r.get(at).copied().flatten(),
                _ => None,
            });
            at += n;
        }
        Ok((out, sums))
    }
}

/// Per chunk, its logits and the backend's summary of them (see [`ModelRunner::logits`]).
type ChunkLogits = (Vec<Vec<f32>>, Vec<Option<LogitSummary>>);
