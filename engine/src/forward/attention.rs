//! The attention half of a decoder layer: projections, q/k norm, clipping, RoPE, the KV
//! cache write, paged attention and the output projection.

use super::EngineError;
use crate::backend::{AttentionPlan, Backend, QkvPrep};
use crate::rope::RopeTable;
use crate::spec::ModelSpec;
use crate::weights::AttentionWeights;

/// What one layer's attention needs besides its input and the KV pool.
pub(super) struct LayerContext<'a, B: Backend> {
    pub backend: &'a B,
    pub spec: &'a ModelSpec,
    pub rope: &'a RopeTable,
    pub layer: usize,
    pub weights: &'a AttentionWeights<B::Weight>,
}

impl<B: Backend> LayerContext<'_, B> {
    /// Attention on the residual stream `x` (one row per token of the step) after adding
    /// `delta` to it (where given) and norming it by `norm` (the layer's input norm), caching
    /// this step's keys and values at `slots`; `plan` carries this layer's sliding window.
    pub fn run(
        &self,
        (x, delta, norm): (&mut B::Act, Option<B::Act>, &B::Weight),
        pool: &mut B::KvPool,
        positions: &[usize],
        slots: &[usize],
        plan: &AttentionPlan,
    ) -> Result<B::Act, EngineError> {
        let (b, a, spec) = (self.backend, self.weights, self.spec);
        let err = EngineError::at(self.layer, "attention");
        let qkv = [
            (&a.q, a.q_bias.as_ref()),
            (&a.k, a.k_bias.as_ref()),
            (&a.v, a.v_bias.as_ref()),
        ];
        let (_, qkv) = b
            .norm_linears(x, delta.as_ref(), (norm, spec.rms_norm_eps), &qkv)
            .map_err(err)?;
        let [q, k, v]: [B::Act; 3] = qkv.try_into().map_err(|got: Vec<B::Act>| {
            err(crate::backend::BackendError::Shape {
                op: "linears",
                detail: format!("{} results for 3 weights", got.len()),
            })
        })?;
        // OLMoE's norm spans the whole projection, Qwen3's each head: the weight's width
        // (q_dim or head_dim) tells the backend which. transformers' OLMoE clamps after the
        // q/k norm, and v too.
        let prep = QkvPrep {
            q_norm: a.q_norm.as_ref(),
            k_norm: a.k_norm.as_ref(),
            eps: spec.rms_norm_eps,
            clip: spec.clip_qkv,
            positions,
            rope: self.rope,
            layer: self.layer,
            slots,
        };
        let q = b.prepare_attention([q, k, v], pool, &prep).map_err(err)?;
        let out = b.attention(&q, pool, self.layer, plan).map_err(err)?;
        b.linear(&out, &a.o, a.o_bias.as_ref()).map_err(err)
    }
}
