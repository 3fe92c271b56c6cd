//! Model families read from a Hugging Face `config.json` into one [`ModelSpec`].
//!
//! Every field that changes the math is read and honoured; a family or an option we do not
//! implement is an error that names the field, never a silently different model.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::rope::{RopeScaling, RopeSpec};

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
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum LayerMlp {
    /// Routed experts (plus the shared expert where the family has one).
    Moe,
    /// A dense SwiGLU MLP of this intermediate size (Qwen `mlp_only_layers`, `decoder_sparse_step`).
    Dense {
        /// Intermediate size.
        intermediate: usize,
    },
}

/// One decoder layer's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerSpec {
    /// Its feed-forward block.
    pub mlp: LayerMlp,
    /// Keys visible to a query at position p are those at p-window+1 ..= p; `None` is full causal.
    pub sliding_window: Option<usize>,
}

/// The shared expert of Qwen2-MoE: a SwiGLU MLP on every token, scaled by sigmoid(gate · x).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedExpertSpec {
    /// Intermediate size.
    pub intermediate: usize,
}

/// Routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
        Config {
            map: &map,
            path: origin,
        }
        .parse()
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

/// A view of config.json that reads fields and names them in errors.
struct Config<'a> {
    map: &'a Map<String, Value>,
    path: &'a str,
}

impl Config<'_> {
    fn missing(&self, field: &str) -> SpecError {
        SpecError::Missing {
            path: self.path.into(),
            field: field.into(),
        }
    }

    fn invalid(&self, field: &str, reason: impl Into<String>) -> SpecError {
        SpecError::Invalid {
            path: self.path.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn unsupported(&self, field: &str, value: &Value, reason: impl Into<String>) -> SpecError {
        SpecError::Unsupported {
            path: self.path.into(),
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// A field that is present and not null.
    fn get(&self, field: &str) -> Option<&Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    fn usize_opt(&self, field: &str) -> Result<Option<usize>, SpecError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.invalid(field, format!("must be a non-negative integer, got {v}"))
                }),
        }
    }

    fn usize(&self, field: &str) -> Result<usize, SpecError> {
        self.usize_opt(field)?.ok_or_else(|| self.missing(field))
    }

    fn positive(&self, field: &str) -> Result<usize, SpecError> {
        let n = self.usize(field)?;
        if n == 0 {
            return Err(self.invalid(field, "must be positive"));
        }
        Ok(n)
    }

    fn f64_opt(&self, field: &str) -> Result<Option<f64>, SpecError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.invalid(field, format!("must be a number, got {v}"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool, SpecError> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.invalid(field, format!("must be true or false, got {v}"))),
        }
    }

    fn usize_list(&self, field: &str) -> Result<Vec<usize>, SpecError> {
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64()
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| self.invalid(field, format!("must list integers, got {v}")))
                })
                .collect(),
            Some(v) => Err(self.invalid(field, format!("must be a list of integers, got {v}"))),
        }
    }

    fn token_ids(&self, field: &str) -> Result<Vec<u32>, SpecError> {
        let to_id = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| self.invalid(field, format!("must be a token id, got {v}")))
        };
        match self.get(field) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(to_id).collect(),
            Some(v) => Ok(vec![to_id(v)?]),
        }
    }

    fn parse(&self) -> Result<ModelSpec, SpecError> {
        let model_type = self
            .get("model_type")
            .ok_or_else(|| self.missing("model_type"))?;
        let family = model_type
            .as_str()
            .and_then(Family::from_model_type)
            .ok_or_else(|| {
                self.unsupported(
                    "model_type",
                    model_type,
                    "supported families are mixtral, qwen2_moe, qwen3_moe and olmoe",
                )
            })?;
        self.reject_unsupported(family)?;

        let hidden_size = self.positive("hidden_size")?;
        let num_heads = self.positive("num_attention_heads")?;
        let num_kv_heads = self.usize_opt("num_key_value_heads")?.unwrap_or(num_heads);
        if num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(self.invalid(
                "num_key_value_heads",
                format!("must divide num_attention_heads ({num_heads}), got {num_kv_heads}"),
            ));
        }
        let head_dim = match self.usize_opt("head_dim")? {
            Some(d) if d > 0 => d,
            Some(_) => return Err(self.invalid("head_dim", "must be positive")),
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(self.invalid(
                        "hidden_size",
                        format!("is not a multiple of num_attention_heads ({num_heads}) and no head_dim is given"),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(self.invalid(
                "head_dim",
                format!("must be even for rotary embeddings, got {head_dim}"),
            ));
        }
        let num_layers = self.positive("num_hidden_layers")?;
        let vocab_size = self.positive("vocab_size")?;
        let max_position_embeddings = self.positive("max_position_embeddings")?;
        let rms_norm_eps = self
            .f64_opt("rms_norm_eps")?
            .ok_or_else(|| self.missing("rms_norm_eps"))?;
        if !(rms_norm_eps > 0.0 && rms_norm_eps < 1.0) {
            return Err(self.invalid(
                "rms_norm_eps",
                format!("must be in (0, 1), got {rms_norm_eps}"),
            ));
        }
        let rope = self.rope(head_dim, max_position_embeddings)?;

        let (experts_field, topk_field) = match family {
            Family::Mixtral => ("num_local_experts", "num_experts_per_tok"),
            _ => ("num_experts", "num_experts_per_tok"),
        };
        // transformers 5 writes `num_local_experts` for every family; the hub's Qwen and OLMoE
        // configs say `num_experts`.
        let experts_field =
            if self.get(experts_field).is_none() && self.get("num_local_experts").is_some() {
                "num_local_experts"
            } else {
                experts_field
            };
        let num_experts = self.positive(experts_field)?;
        let top_k = self.positive(topk_field)?;
        if top_k > num_experts {
            return Err(self.invalid(
                topk_field,
                format!("exceeds {experts_field} ({num_experts})"),
            ));
        }
        let expert_intermediate = match family {
            Family::Mixtral | Family::Olmoe => self.positive("intermediate_size")?,
            Family::Qwen2Moe | Family::Qwen3Moe => self.positive("moe_intermediate_size")?,
        };
        let norm_topk_prob = match family {
            Family::Mixtral => true,
            Family::Qwen2Moe | Family::Olmoe => self.bool_or("norm_topk_prob", false)?,
            Family::Qwen3Moe => self.bool_or("norm_topk_prob", true)?,
        };
        let shared_expert = match family {
            Family::Qwen2Moe => match self.usize_opt("shared_expert_intermediate_size")? {
                Some(0) | None => None,
                Some(n) => Some(SharedExpertSpec { intermediate: n }),
            },
            _ => None,
        };

        let (qkv_bias, o_bias) = match family {
            Family::Mixtral => (false, false),
            Family::Qwen2Moe => (true, false),
            Family::Qwen3Moe | Family::Olmoe => {
                let b = self.bool_or("attention_bias", false)?;
                (b, b)
            }
        };
        let qk_norm = match family {
            Family::Mixtral | Family::Qwen2Moe => QkNorm::None,
            Family::Qwen3Moe => QkNorm::PerHead,
            Family::Olmoe => QkNorm::Full,
        };
        let clip_qkv = match family {
            Family::Olmoe => match self.f64_opt("clip_qkv")? {
                Some(c) if c > 0.0 => Some(c as f32),
                Some(c) => {
                    return Err(self.invalid("clip_qkv", format!("must be positive, got {c}")))
                }
                None => None,
            },
            _ => None,
        };
        let tie_word_embeddings = self.bool_or("tie_word_embeddings", false)?;

        let layers = self.layers(family, num_layers)?;
        let bos_token_id = self.token_ids("bos_token_id")?.first().copied();
        let eos_token_ids = self.token_ids("eos_token_id")?;

        Ok(ModelSpec {
            family,
            hidden_size,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            max_position_embeddings,
            rms_norm_eps: rms_norm_eps as f32,
            rope,
            qkv_bias,
            o_bias,
            qk_norm,
            clip_qkv,
            tie_word_embeddings,
            moe: MoeSpec {
                num_experts,
                top_k,
                expert_intermediate,
                norm_topk_prob,
                shared_expert,
            },
            layers,
            bos_token_id,
            eos_token_ids,
        })
    }

    /// Options that would change the math and that TileFlow does not implement.
    fn reject_unsupported(&self, family: Family) -> Result<(), SpecError> {
        if let Some(v) = self.get("hidden_act") {
            if v.as_str() != Some("silu") {
                return Err(self.unsupported(
                    "hidden_act",
                    v,
                    "only silu (SwiGLU) experts are implemented",
                ));
            }
        }
        if let Some(v) = self.get("quantization_config") {
            return Err(self.unsupported(
                "quantization_config",
                v,
                "quantized checkpoints are not supported yet",
            ));
        }
        if let Some(v) = self.get("partial_rotary_factor") {
            if v.as_f64() != Some(1.0) {
                return Err(self.unsupported(
                    "partial_rotary_factor",
                    v,
                    "only full rotary (1.0) is implemented",
                ));
            }
        }
        if let Some(v) = self.get("mlp_bias") {
            if v.as_bool() == Some(true) {
                return Err(self.unsupported(
                    "mlp_bias",
                    v,
                    "MLP biases are not part of these families",
                ));
            }
        }
        if family == Family::Mixtral {
            if let Some(v) = self.get("attention_bias") {
                if v.as_bool() == Some(true) {
                    return Err(self.unsupported(
                        "attention_bias",
                        v,
                        "Mixtral has no attention bias",
                    ));
                }
            }
        }
        if let Some(v) = self.get("scoring_func") {
            if v.as_str() != Some("softmax") {
                return Err(self.unsupported(
                    "scoring_func",
                    v,
                    "only softmax routing is implemented",
                ));
            }
        }
        Ok(())
    }

    fn rope(&self, head_dim: usize, max_pos: usize) -> Result<RopeSpec, SpecError> {
        // transformers 5 writes `rope_parameters` (with rope_theta inside); hub checkpoints carry
        // `rope_theta` and `rope_scaling` at the top level. Accept both.
        let params_field = if self.get("rope_parameters").is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let params = match self.get(params_field) {
            None => None,
            Some(Value::Object(m)) => Some(m),
            Some(v) => {
                return Err(self.invalid(params_field, format!("must be an object, got {v}")))
            }
        };
        let theta = params
            .and_then(|m| m.get("rope_theta"))
            .and_then(Value::as_f64)
            .or(self.f64_opt("rope_theta")?)
            .unwrap_or(10000.0);
        if theta <= 1.0 {
            return Err(self.invalid("rope_theta", format!("must be > 1, got {theta}")));
        }
        let scaling = match params {
            None => RopeScaling::Default,
            Some(m) => self.rope_scaling(params_field, m, max_pos)?,
        };
        Ok(RopeSpec {
            theta,
            head_dim,
            scaling,
        })
    }

    fn rope_scaling(
        &self,
        field: &str,
        m: &Map<String, Value>,
        max_pos: usize,
    ) -> Result<RopeScaling, SpecError> {
        let kind = m
            .get("rope_type")
            .or_else(|| m.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |key: &str| -> Result<Option<f64>, SpecError> {
            match m.get(key).filter(|v| !v.is_null()) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                    self.invalid(
                        &format!("{field}.{key}"),
                        format!("must be a number, got {v}"),
                    )
                }),
            }
        };
        let factor = |key: &str| -> Result<f64, SpecError> {
            let f = num(key)?.ok_or_else(|| self.missing(&format!("{field}.{key}")))?;
            if f <= 0.0 {
                return Err(self.invalid(
                    &format!("{field}.{key}"),
                    format!("must be positive, got {f}"),
                ));
            }
            Ok(f)
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear {
                factor: factor("factor")?,
            }),
            "yarn" => {
                let original = num("original_max_position_embeddings")?;
                // As transformers: with `original_max_position_embeddings` present, the factor is
                // the ratio of the configured context to the original one.
                let (factor, original) = match original {
                    Some(o) if o > 0.0 => (max_pos as f64 / o, o),
                    Some(o) => {
                        return Err(self.invalid(
                            &format!("{field}.original_max_position_embeddings"),
                            format!("must be positive, got {o}"),
                        ))
                    }
                    None => (factor("factor")?, max_pos as f64),
                };
                let truncate = match m.get("truncate") {
                    None | Some(Value::Null) => true,
                    Some(v) => v.as_bool().ok_or_else(|| {
                        self.invalid(&format!("{field}.truncate"), "must be true or false")
                    })?,
                };
                Ok(RopeScaling::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    attention_factor: num("attention_factor")?,
                    beta_fast: num("beta_fast")?.filter(|b| *b != 0.0).unwrap_or(32.0),
                    beta_slow: num("beta_slow")?.filter(|b| *b != 0.0).unwrap_or(1.0),
                    mscale: num("mscale")?,
                    mscale_all_dim: num("mscale_all_dim")?,
                    truncate,
                })
            }
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: factor("factor")?,
                low_freq_factor: factor("low_freq_factor")?,
                high_freq_factor: factor("high_freq_factor")?,
                original_max_position_embeddings: factor("original_max_position_embeddings")?,
            }),
            other => Err(self.unsupported(
                &format!("{field}.rope_type"),
                &Value::String(other.to_string()),
                "supported rope types are default, linear, yarn and llama3",
            )),
        }
    }

    fn layers(&self, family: Family, num_layers: usize) -> Result<Vec<LayerSpec>, SpecError> {
        let window = match family {
            Family::Mixtral => self.usize_opt("sliding_window")?,
            Family::Qwen2Moe | Family::Qwen3Moe => {
                if self.bool_or("use_sliding_window", false)? {
                    Some(
                        self.usize_opt("sliding_window")?
                            .ok_or_else(|| self.missing("sliding_window"))?,
                    )
                } else {
                    None
                }
            }
            Family::Olmoe => None,
        };
        if window == Some(0) {
            return Err(self.invalid("sliding_window", "must be positive"));
        }
        // Qwen: sliding attention only from `max_window_layers` on; an explicit `layer_types`
        // (transformers 5) wins over both.
        let max_window_layers = match family {
            Family::Qwen2Moe | Family::Qwen3Moe => {
                self.usize_opt("max_window_layers")?.unwrap_or(0)
            }
            _ => 0,
        };
        let layer_types: Option<Vec<String>> = match self.get("layer_types") {
            None => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            self.invalid("layer_types", format!("must list strings, got {v}"))
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(v) => return Err(self.invalid("layer_types", format!("must be a list, got {v}"))),
        };
        if let Some(types) = &layer_types {
            if types.len() != num_layers {
                return Err(self.invalid(
                    "layer_types",
                    format!(
                        "has {} entries but num_hidden_layers is {num_layers}",
                        types.len()
                    ),
                ));
            }
        }

        let (sparse_step, mlp_only, dense_intermediate) = match family {
            Family::Qwen2Moe | Family::Qwen3Moe => {
                let step = self.usize_opt("decoder_sparse_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(self.invalid("decoder_sparse_step", "must be positive"));
                }
                let only = self.usize_list("mlp_only_layers")?;
                if let Some(bad) = only.iter().find(|&&l| l >= num_layers) {
                    return Err(self.invalid(
                        "mlp_only_layers",
                        format!("names layer {bad} of {num_layers}"),
                    ));
                }
                (step, only, self.usize_opt("intermediate_size")?)
            }
            _ => (1, Vec::new(), None),
        };

        (0..num_layers)
            .map(|i| {
                let moe = !mlp_only.contains(&i) && (i + 1) % sparse_step == 0;
                let mlp = if moe {
                    LayerMlp::Moe
                } else {
                    let intermediate = dense_intermediate
                        .filter(|n| *n > 0)
                        .ok_or_else(|| self.missing("intermediate_size"))?;
                    LayerMlp::Dense { intermediate }
                };
                let sliding = match &layer_types {
                    Some(types) => match types[i].as_str() {
                        "full_attention" => false,
                        "sliding_attention" => true,
                        other => {
                            return Err(self.unsupported(
                                "layer_types",
                                &Value::String(other.into()),
                                "layer types are full_attention and sliding_attention",
                            ))
                        }
                    },
                    None => window.is_some() && i >= max_window_layers,
                };
                let sliding_window = if sliding {
                    Some(
                        window
                            .or(self.usize_opt("sliding_window")?)
                            .ok_or_else(|| self.missing("sliding_window"))?,
                    )
                } else {
                    None
                };
                Ok(LayerSpec {
                    mlp,
                    sliding_window,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mixtral() -> Value {
        serde_json::json!({
            "model_type": "mixtral", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "num_local_experts": 8,
            "num_experts_per_tok": 2, "intermediate_size": 32, "rope_theta": 1e6,
            "sliding_window": 8, "hidden_act": "silu"
        })
    }

    fn parse(v: &Value) -> Result<ModelSpec, SpecError> {
        ModelSpec::from_config_str(&v.to_string(), "config.json")
    }

    #[test]
    fn mixtral_reads_every_field() {
        let s = parse(&mixtral()).unwrap();
        assert_eq!(s.family, Family::Mixtral);
        assert_eq!(s.head_dim, 16);
        assert_eq!(s.num_kv_heads, 2);
        assert_eq!(s.rope.theta, 1e6);
        assert!(s.moe.norm_topk_prob);
        assert!(s
            .layers
            .iter()
            .all(|l| l.sliding_window == Some(8) && l.mlp == LayerMlp::Moe));
    }

    #[test]
    fn qwen2_moe_dense_layers_and_shared_expert() {
        let v = serde_json::json!({
            "model_type": "qwen2_moe", "hidden_size": 64, "num_attention_heads": 4,
            "num_key_value_heads": 2, "num_hidden_layers": 4, "vocab_size": 100,
            "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32, "intermediate_size": 96,
            "shared_expert_intermediate_size": 48, "decoder_sparse_step": 2, "mlp_only_layers": [3],
            "use_sliding_window": false, "sliding_window": 16
        });
        let s = parse(&v).unwrap();
        let kinds: Vec<_> = s.layers.iter().map(|l| l.mlp).collect();
        let dense = LayerMlp::Dense { intermediate: 96 };
        assert_eq!(kinds, vec![dense, LayerMlp::Moe, dense, dense]);
        assert_eq!(
            s.moe.shared_expert,
            Some(SharedExpertSpec { intermediate: 48 })
        );
        assert!(s.qkv_bias && !s.o_bias && !s.moe.norm_topk_prob);
        assert!(s.layers.iter().all(|l| l.sliding_window.is_none()));
    }

    #[test]
    fn qwen3_head_dim_and_yarn_from_rope_parameters() {
        let v = serde_json::json!({
            "model_type": "qwen3_moe", "hidden_size": 64, "num_attention_heads": 4, "head_dim": 32,
            "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100,
            "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "num_experts": 8,
            "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e5,
                                 "original_max_position_embeddings": 64}
        });
        let s = parse(&v).unwrap();
        assert_eq!(s.head_dim, 32);
        assert_eq!(s.qk_norm, QkNorm::PerHead);
        assert!(s.moe.norm_topk_prob);
        assert_eq!(s.rope.theta, 5e5);
        assert!(matches!(s.rope.scaling, RopeScaling::Yarn { factor, .. } if factor == 4.0));
    }

    #[test]
    fn unsupported_options_name_the_field() {
        let mut v = mixtral();
        v["rope_scaling"] = serde_json::json!({"rope_type": "dynamic", "factor": 2.0});
        let e = parse(&v).unwrap_err().to_string();
        assert!(
            e.contains("rope_scaling.rope_type") && e.contains("dynamic"),
            "{e}"
        );

        let mut v = mixtral();
        v["model_type"] = "llama".into();
        assert!(parse(&v).unwrap_err().to_string().contains("model_type"));

        let mut v = mixtral();
        v["hidden_act"] = "gelu".into();
        assert!(parse(&v).unwrap_err().to_string().contains("hidden_act"));

        let mut v = mixtral();
        v["num_key_value_heads"] = 3.into();
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("num_key_value_heads"));

        let mut v = mixtral();
        v.as_object_mut().unwrap().remove("num_local_experts");
        assert!(parse(&v)
            .unwrap_err()
            .to_string()
            .contains("num_local_experts"));

        let mut v = mixtral();
        v["vocab_size"] = "many".into();
        assert!(parse(&v).unwrap_err().to_string().contains("vocab_size"));
    }

    #[test]
    fn olmoe_full_qk_norm_and_clip() {
        let v = serde_json::json!({
            "model_type": "olmoe", "hidden_size": 64, "num_attention_heads": 4,
            "num_hidden_layers": 2, "vocab_size": 100, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "num_experts": 8, "num_experts_per_tok": 2,
            "intermediate_size": 32, "clip_qkv": 8.0,
            "rope_scaling": {"type": "linear", "factor": 2.0}
        });
        let s = parse(&v).unwrap();
        assert_eq!(s.qk_norm, QkNorm::Full);
        assert_eq!(s.clip_qkv, Some(8.0));
        assert_eq!(s.num_kv_heads, 4);
        assert!(matches!(s.rope.scaling, RopeScaling::Linear { factor } if factor == 2.0));
    }
}
