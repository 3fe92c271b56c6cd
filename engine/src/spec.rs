//! Model families read from a Hugging Face `config.json` into one [`ModelSpec`].
//!
//! Every field that changes the math is read as transformers 5 reads it and honoured; a family
//! or an option we do not implement is an error that names the field, never a silently
//! different model. The parsing lives in `config` (and its RoPE part in `rope_config`); this
//! file holds the spec types and [`ModelSpec::validate`], which a tile pack's manifest is
//! checked with too.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::rope::{RopeScaling, RopeSpec};

mod config;
mod rope_config;
#[cfg(test)]
mod tests;

use config::Config;

/// Why a `config.json` could not become a model spec.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The config file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON, or not a JSON object.
    #[error("{path} is not a JSON object: {reason}")]
    NotJson {
        /// The config file.
        path: String,
        /// What the parser said.
        reason: String,
    },
    /// A field the family needs is absent.
    #[error("{path}: missing field `{field}`")]
    Missing {
        /// The config file.
        path: String,
        /// The field.
        field: String,
    },
    /// A field has the wrong type or an out-of-range value.
    #[error("{path}: field `{field}` {reason}")]
    Invalid {
        /// The config file.
        path: String,
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The field's value selects something TileFlow does not implement.
    #[error("{path}: field `{field}` = {value} is not supported: {reason}")]
    Unsupported {
        /// The config file.
        path: String,
        /// The field.
        field: String,
        /// Its value, as JSON.
        value: String,
        /// What is supported instead.
        reason: String,
    },
}

/// The model families TileFlow implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Mixtral (`MixtralForCausalLM`).
    Mixtral,
    /// Qwen2-MoE (`Qwen2MoeForCausalLM`): shared expert with a sigmoid gate, q/k/v bias.
    Qwen2Moe,
    /// Qwen3-MoE (`Qwen3MoeForCausalLM`): per-head q/k RMSNorm, free head_dim.
    Qwen3Moe,
    /// OLMoE (`OlmoeForCausalLM`): q/k RMSNorm over the whole projection.
    Olmoe,
}

impl Family {
    /// The `model_type` string of config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Mixtral => "mixtral",
            Family::Qwen2Moe => "qwen2_moe",
            Family::Qwen3Moe => "qwen3_moe",
            Family::Olmoe => "olmoe",
        }
    }

    /// The `architectures[0]` string of config.json.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Mixtral => "MixtralForCausalLM",
            Family::Qwen2Moe => "Qwen2MoeForCausalLM",
            Family::Qwen3Moe => "Qwen3MoeForCausalLM",
            Family::Olmoe => "OlmoeForCausalLM",
        }
    }

    /// The family for a `model_type` string.
    pub fn from_model_type(s: &str) -> Option<Family> {
        [
            Family::Mixtral,
            Family::Qwen2Moe,
            Family::Qwen3Moe,
            Family::Olmoe,
        ]
        .into_iter()
        .find(|f| f.model_type() == s)
    }

    /// The module name that holds a layer's MoE block on the hub (`block_sparse_moe` or `mlp`).
    pub fn moe_module(self) -> &'static str {
        match self {
            Family::Mixtral => "block_sparse_moe",
            _ => "mlp",
        }
    }
}

/// How q and k are normalised before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    /// No q/k norm.
    None,
    /// RMSNorm over each head's `head_dim` (Qwen3).
    PerHead,
    /// RMSNorm over the whole q (`heads*head_dim`) and k (`kv_heads*head_dim`) projection (OLMoE).
    Full,
}

/// The feed-forward block of one decoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", try_from = "LayerMlpJson")]
pub enum LayerMlp {
    /// Routed experts (plus the shared expert where the family has one).
    Moe,
    /// A dense SwiGLU MLP of this intermediate size (Qwen `mlp_only_layers`, `decoder_sparse_step`).
    Dense {
        /// Intermediate size.
        intermediate: usize,
    },
}

/// [`LayerMlp`] as stored, read strictly: serde's `deny_unknown_fields` does not reach the unit
/// variant of an internally tagged enum, so `{"kind": "moe", "intermediate": 5}` would pass.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerMlpJson {
    kind: LayerMlpKind,
    intermediate: Option<usize>,
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum LayerMlpKind {
    Moe,
    Dense,
}

impl TryFrom<LayerMlpJson> for LayerMlp {
    type Error = String;

    fn try_from(j: LayerMlpJson) -> Result<LayerMlp, String> {
        match (j.kind, j.intermediate) {
            (LayerMlpKind::Moe, None) => Ok(LayerMlp::Moe),
            (LayerMlpKind::Moe, Some(_)) => {
                Err("unknown field `intermediate` of a moe layer".into())
            }
            (LayerMlpKind::Dense, Some(intermediate)) => Ok(LayerMlp::Dense { intermediate }),
            (LayerMlpKind::Dense, None) => Err("missing field `intermediate`".into()),
        }
    }
}

/// One decoder layer's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerSpec {
    /// Its feed-forward block.
    pub mlp: LayerMlp,
    /// Keys visible to a query at position p are those at p-window+1 ..= p; `None` is full causal.
    pub sliding_window: Option<usize>,
}

/// The shared expert of Qwen2-MoE: a SwiGLU MLP on every token, scaled by sigmoid(gate · x).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedExpertSpec {
    /// Intermediate size.
    pub intermediate: usize,
}

/// Routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeSpec {
    /// Experts per MoE layer.
    pub num_experts: usize,
    /// Experts selected per token.
    pub top_k: usize,
    /// Intermediate size of one routed expert.
    pub expert_intermediate: usize,
    /// Renormalise the selected experts' softmax weights to sum to one.
    pub norm_topk_prob: bool,
    /// The shared expert, where the family has one.
    pub shared_expert: Option<SharedExpertSpec>,
}

/// Everything about a model's architecture that the engine computes with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The family.
    pub family: Family,
    /// Model (residual stream) width.
    pub hidden_size: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one attention head (independent of hidden/heads in Qwen3).
    pub head_dim: usize,
    /// Rows of the embedding and the LM head.
    pub vocab_size: usize,
    /// Longest sequence the model was configured for.
    pub max_position_embeddings: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f32,
    /// Rotary embedding.
    pub rope: RopeSpec,
    /// q, k and v projections have a bias.
    pub qkv_bias: bool,
    /// The output projection has a bias.
    pub o_bias: bool,
    /// q/k normalisation.
    pub qk_norm: QkNorm,
    /// Clamp q, k and v to ±this after projection (OLMoE `clip_qkv`).
    pub clip_qkv: Option<f32>,
    /// The LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Routed experts.
    pub moe: MoeSpec,
    /// One entry per decoder layer.
    pub layers: Vec<LayerSpec>,
    /// BOS token id from config.json, if given.
    pub bos_token_id: Option<u32>,
    /// EOS token ids from config.json.
    pub eos_token_ids: Vec<u32>,
}

impl ModelSpec {
    /// Reads and validates `config.json`.
    pub fn from_config_file(path: &Path) -> Result<ModelSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Read {
            path: path.display().to_string(),
            source,
        })?;
        ModelSpec::from_config_str(&text, &path.display().to_string())
    }

    /// Parses `config.json` text; `origin` names it in errors.
    pub fn from_config_str(text: &str, origin: &str) -> Result<ModelSpec, SpecError> {
        let value: Value = serde_json::from_str(text).map_err(|e| SpecError::NotJson {
            path: origin.to_string(),
            reason: e.to_string(),
        })?;
        let Value::Object(map) = value else {
            return Err(SpecError::NotJson {
                path: origin.to_string(),
                reason: "the top level is not an object".into(),
            });
        };
        let spec = Config::new(&map, origin).parse()?;
        spec.validate().map_err(|fault| SpecError::Invalid {
            path: origin.to_string(),
            field: fault.field,
            reason: fault.reason,
        })?;
        Ok(spec)
    }

    /// Number of decoder layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Indices of the layers with routed experts.
    pub fn moe_layers(&self) -> impl Iterator<Item = usize> + '_ {
        self.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.mlp == LayerMlp::Moe)
            .map(|(i, _)| i)
    }

    /// Elements of one routed expert (gate + up + down).
    pub fn expert_elements(&self) -> usize {
        3 * self.hidden_size * self.moe.expert_intermediate
    }

    /// Width of the q projection output.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of the k (and v) projection output.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// A broken invariant of a [`ModelSpec`]: which field, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{field}` {reason}")]
pub struct SpecFault {
    /// The spec field (`moe.top_k`, `layers[3].sliding_window`, …).
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Bytes the engine may hold for one f32 tensor; far above any real model, far below what makes
/// size arithmetic overflow.
const MAX_TENSOR_BYTES: usize = 1 << 44;

impl ModelSpec {
    /// Checks the invariants the engine relies on: every size positive, heads that group,
    /// an even head width, a RoPE of that width, windows and intermediate sizes that are not
    /// zero, a top-k within the experts, and tensor sizes whose arithmetic cannot overflow.
    ///
    /// A spec parsed from config.json always passes; one read from a pack's manifest is
    /// checked with this before any of it is used.
    pub fn validate(&self) -> Result<(), SpecFault> {
        let fault = |field: &str, reason: String| {
            Err(SpecFault {
                field: field.to_string(),
                reason,
            })
        };
        for (field, n) in [
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if n == 0 {
                return fault(field, "must be positive".into());
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return fault(
                "num_kv_heads",
                format!(
                    "({}) must divide num_heads ({})",
                    self.num_kv_heads, self.num_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return fault(
                "head_dim",
                format!("must be even for rotary embeddings, got {}", self.head_dim),
            );
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return fault(
                "rms_norm_eps",
                format!("must be in (0, 1), got {}", self.rms_norm_eps),
            );
        }
        if let Some(c) = self.clip_qkv {
            if !(c.is_finite() && c > 0.0) {
                return fault("clip_qkv", format!("must be a positive number, got {c}"));
            }
        }
        self.validate_rope()?;
        if self.layers.is_empty() {
            return fault("layers", "must list at least one decoder layer".into());
        }
        for (i, layer) in self.layers.iter().enumerate() {
            if layer.sliding_window == Some(0) {
                return fault(
                    &format!("layers[{i}].sliding_window"),
                    "must be positive".into(),
                );
            }
            if layer.mlp == (LayerMlp::Dense { intermediate: 0 }) {
                return fault(
                    &format!("layers[{i}].mlp.intermediate"),
                    "must be positive".into(),
                );
            }
        }
        self.validate_moe()?;
        self.validate_sizes()
    }

    fn validate_rope(&self) -> Result<(), SpecFault> {
        let fault = |field: &str, reason: String| {
            Err(SpecFault {
                field: format!("rope.{field}"),
                reason,
            })
        };
        let r = &self.rope;
        if r.head_dim != self.head_dim {
            return fault(
                "head_dim",
                format!("({}) differs from head_dim ({})", r.head_dim, self.head_dim),
            );
        }
        if !(r.theta.is_finite() && r.theta > 1.0) {
            return fault(
                "theta",
                format!("must be a finite number > 1, got {}", r.theta),
            );
        }
        let positive: Vec<(&str, f64)> = match r.scaling {
            RopeScaling::Default => Vec::new(),
            RopeScaling::Linear { factor } => vec![("factor", factor)],
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                ..
            } => vec![
                ("factor", factor),
                (
                    "original_max_position_embeddings",
                    original_max_position_embeddings,
                ),
            ],
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => vec![
                ("factor", factor),
                ("low_freq_factor", low_freq_factor),
                ("high_freq_factor", high_freq_factor),
                (
                    "original_max_position_embeddings",
                    original_max_position_embeddings,
                ),
            ],
        };
        for (field, v) in positive {
            if !(v.is_finite() && v > 0.0) {
                return fault(
                    &format!("scaling.{field}"),
                    format!("must be a positive number, got {v}"),
                );
            }
        }
        Ok(())
    }

    fn validate_moe(&self) -> Result<(), SpecFault> {
        let fault = |field: &str, reason: String| {
            Err(SpecFault {
                field: format!("moe.{field}"),
                reason,
            })
        };
        let m = &self.moe;
        if self.moe_layers().next().is_none() {
            return Err(SpecFault {
                field: "layers".into(),
                reason: "has no layer with routed experts".into(),
            });
        }
        if m.num_experts == 0 {
            return fault("num_experts", "must be positive".into());
        }
        if m.top_k == 0 || m.top_k > m.num_experts {
            return fault(
                "top_k",
                format!(
                    "must be between 1 and num_experts ({}), got {}",
                    m.num_experts, m.top_k
                ),
            );
        }
        if m.expert_intermediate == 0 {
            return fault("expert_intermediate", "must be positive".into());
        }
        if m.shared_expert.is_some_and(|s| s.intermediate == 0) {
            return fault("shared_expert.intermediate", "must be positive".into());
        }
        Ok(())
    }

    /// Every tensor the engine allocates from these sizes stays below [`MAX_TENSOR_BYTES`].
    fn validate_sizes(&self) -> Result<(), SpecFault> {
        let h = self.hidden_size;
        let mut tensors: Vec<(&str, Vec<usize>)> = vec![
            ("vocab_size", vec![self.vocab_size, h]),
            ("num_heads", vec![self.num_heads, self.head_dim, h]),
            ("num_kv_heads", vec![self.num_kv_heads, self.head_dim, h]),
            ("moe.num_experts", vec![self.moe.num_experts, h]),
            (
                "moe.expert_intermediate",
                vec![3, self.moe.expert_intermediate, h],
            ),
        ];
        if let Some(s) = self.moe.shared_expert {
            tensors.push(("moe.shared_expert.intermediate", vec![s.intermediate, h]));
        }
        for l in &self.layers {
            if let LayerMlp::Dense { intermediate } = l.mlp {
                tensors.push(("layers.mlp.intermediate", vec![intermediate, h]));
            }
        }
        for (field, dims) in tensors {
            let bytes = dims
                .iter()
                .try_fold(std::mem::size_of::<f32>(), |acc, &d| acc.checked_mul(d));
            if bytes.is_none_or(|b| b > MAX_TENSOR_BYTES) {
                return Err(SpecFault {
                    field: field.to_string(),
                    reason: format!(
                        "makes a tensor of {} f32 values, more than this build handles",
                        dims.iter()
                            .map(usize::to_string)
                            .collect::<Vec<_>>()
                            .join(" x ")
                    ),
                });
            }
        }
        Ok(())
    }
}
