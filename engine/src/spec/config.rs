//! Reading a Hugging Face `config.json` the way transformers 5 reads it for each family.
//!
//! Where transformers fills an absent field from a class default that is a fixed number rather
//! than something derived (Qwen2-MoE's `shared_expert_intermediate_size` = 5632, Mixtral's
//! `num_key_value_heads` = 8, …), we ask for the field instead: a config that relies on such a
//! default is almost certainly not describing the checkpoint beside it.

use serde_json::{Map, Value};

use super::{Family, LayerMlp, LayerSpec, ModelSpec, MoeSpec, QkNorm, SharedExpertSpec, SpecError};

/// The layer types of transformers' `layer_types` that TileFlow implements.
const FULL_ATTENTION: &str = "full_attention";
const SLIDING_ATTENTION: &str = "sliding_attention";

/// A view of config.json that reads fields and names them in errors.
pub(super) struct Config<'a> {
    map: &'a Map<String, Value>,
    path: &'a str,
}

impl<'a> Config<'a> {
    pub(super) fn new(map: &'a Map<String, Value>, path: &'a str) -> Config<'a> {
        Config { map, path }
    }

    pub(super) fn missing(&self, field: &str) -> SpecError {
        SpecError::Missing {
            path: self.path.into(),
            field: field.into(),
        }
    }

    pub(super) fn invalid(&self, field: &str, reason: impl Into<String>) -> SpecError {
        SpecError::Invalid {
            path: self.path.into(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub(super) fn unsupported(
        &self,
        field: &str,
        value: &Value,
        reason: impl Into<String>,
    ) -> SpecError {
        SpecError::Unsupported {
            path: self.path.into(),
            field: field.into(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// A field that is present and not null.
    pub(super) fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// The field is written out as `null`.
    fn is_null(&self, field: &str) -> bool {
        self.map.get(field).is_some_and(Value::is_null)
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

    pub(super) fn f64_opt(&self, field: &str) -> Result<Option<f64>, SpecError> {
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

    pub(super) fn parse(&self) -> Result<ModelSpec, SpecError> {
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
        let num_kv_heads = self.num_kv_heads(family, num_heads)?;
        let head_dim = self.head_dim(family, hidden_size, num_heads)?;
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
        let moe = self.moe(family)?;
        let (qkv_bias, o_bias) = match family {
            Family::Mixtral => (false, false),
            // transformers 5 reads `qkv_bias` (default true); o_proj never has a bias.
            Family::Qwen2Moe => (self.bool_or("qkv_bias", true)?, false),
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
                Some(c) if c.is_finite() && c > 0.0 => Some(c as f32),
                Some(c) => {
                    return Err(self.invalid("clip_qkv", format!("must be positive, got {c}")))
                }
                None => None,
            },
            // The other families do not read it.
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
            moe,
            layers,
            bos_token_id,
            eos_token_ids,
        })
    }

    /// `num_key_value_heads`: Mixtral and OLMoE turn `null` into `num_attention_heads` (OLMoE an
    /// absent field too); the Qwen classes have fixed defaults, so there it is required.
    fn num_kv_heads(&self, family: Family, num_heads: usize) -> Result<usize, SpecError> {
        const FIELD: &str = "num_key_value_heads";
        let n = match self.usize_opt(FIELD)? {
            Some(n) => n,
            None => match family {
                Family::Olmoe => num_heads,
                Family::Mixtral if self.is_null(FIELD) => num_heads,
                _ => return Err(self.missing(FIELD)),
            },
        };
        if n == 0 || !num_heads.is_multiple_of(n) {
            return Err(self.invalid(
                FIELD,
                format!("must divide num_attention_heads ({num_heads}), got {n}"),
            ));
        }
        Ok(n)
    }

    /// `head_dim`, or hidden_size / num_attention_heads. OLMoE sizes its q/k norm from the
    /// latter, so there a different `head_dim` is a model transformers cannot run.
    fn head_dim(&self, family: Family, hidden: usize, heads: usize) -> Result<usize, SpecError> {
        let derived = hidden.is_multiple_of(heads).then_some(hidden / heads);
        let head_dim = match self.usize_opt("head_dim")? {
            Some(0) => return Err(self.invalid("head_dim", "must be positive")),
            Some(d) => {
                if family == Family::Olmoe && Some(d) != derived {
                    return Err(self.unsupported(
                        "head_dim",
                        &Value::from(d),
                        format!(
                            "OLMoE's q/k norm spans hidden_size ({hidden}), so head_dim must be \
                             hidden_size / num_attention_heads ({heads})"
                        ),
                    ));
                }
                d
            }
            None => derived.ok_or_else(|| {
                self.invalid(
                    "hidden_size",
                    format!(
                        "is not a multiple of num_attention_heads ({heads}) and no head_dim is given"
                    ),
                )
            })?,
        };
        if head_dim % 2 != 0 {
            return Err(self.invalid(
                "head_dim",
                format!("must be even for rotary embeddings, got {head_dim}"),
            ));
        }
        Ok(head_dim)
    }

    /// The expert count and the field it came from. transformers 5 maps `num_experts` onto
    /// Mixtral's `num_local_experts` and back for OLMoE and Qwen3-MoE (and writes
    /// `num_local_experts` for Qwen3-MoE); Qwen2-MoE reads only `num_experts`.
    fn num_experts(&self, family: Family) -> Result<(&'static str, usize), SpecError> {
        let (main, alias) = match family {
            Family::Mixtral => ("num_local_experts", Some("num_experts")),
            Family::Qwen2Moe => ("num_experts", None),
            Family::Qwen3Moe | Family::Olmoe => ("num_experts", Some("num_local_experts")),
        };
        let a = self.usize_opt(main)?;
        let b = match alias {
            Some(f) => self.usize_opt(f)?.map(|n| (f, n)),
            None => None,
        };
        match (a, b) {
            (Some(x), Some((f, y))) if x != y => {
                Err(self.invalid(main, format!("is {x} but {f} is {y}")))
            }
            (Some(x), _) => Ok((main, x)),
            (None, Some((f, y))) => Ok((f, y)),
            (None, None) => Err(self.missing(main)),
        }
    }

    fn moe(&self, family: Family) -> Result<MoeSpec, SpecError> {
        let (experts_field, num_experts) = self.num_experts(family)?;
        if num_experts == 0 {
            return Err(match family {
                Family::Qwen2Moe | Family::Qwen3Moe => self.unsupported(
                    experts_field,
                    &Value::from(0),
                    "it makes every layer a dense MLP; TileFlow serves models with routed experts",
                ),
                _ => self.invalid(experts_field, "must be positive"),
            });
        }
        let topk_field = "num_experts_per_tok";
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
            // Mixtral always renormalises and has no such field.
            Family::Mixtral => true,
            // transformers 5 defaults it to false for the other three (Qwen3-MoE included).
            _ => self.bool_or("norm_topk_prob", false)?,
        };
        let shared_expert = match family {
            // A zero-width shared expert adds sigmoid(g)·0: no shared expert at all.
            Family::Qwen2Moe => match self.usize("shared_expert_intermediate_size")? {
                0 => None,
                n => Some(SharedExpertSpec { intermediate: n }),
            },
            _ => None,
        };
        Ok(MoeSpec {
            num_experts,
            top_k,
            expert_intermediate,
            norm_topk_prob,
            shared_expert,
        })
    }

    /// Options that would change the math and that TileFlow does not implement.
    fn reject_unsupported(&self, family: Family) -> Result<(), SpecError> {
        if let Some(v) = self.get("hidden_act") {
            // transformers' ACT2FN maps both names to SiLU.
            if !matches!(v.as_str(), Some("silu" | "swish")) {
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

    fn layers(&self, family: Family, num_layers: usize) -> Result<Vec<LayerSpec>, SpecError> {
        let mlps = self.layer_mlps(family, num_layers)?;
        let windows = self.layer_windows(family, num_layers)?;
        Ok(mlps
            .into_iter()
            .zip(windows)
            .map(|(mlp, sliding_window)| LayerSpec {
                mlp,
                sliding_window,
            })
            .collect())
    }

    /// Qwen: a layer has routed experts unless `mlp_only_layers` names it or
    /// (i + 1) % `decoder_sparse_step` != 0; the others are dense MLPs of `intermediate_size`.
    fn layer_mlps(&self, family: Family, num_layers: usize) -> Result<Vec<LayerMlp>, SpecError> {
        if matches!(family, Family::Mixtral | Family::Olmoe) {
            return Ok(vec![LayerMlp::Moe; num_layers]);
        }
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
        let mlps = (0..num_layers)
            .map(|i| {
                if !only.contains(&i) && (i + 1) % step == 0 {
                    return Ok(LayerMlp::Moe);
                }
                let intermediate = self
                    .usize_opt("intermediate_size")?
                    .filter(|n| *n > 0)
                    .ok_or_else(|| self.missing("intermediate_size"))?;
                Ok(LayerMlp::Dense { intermediate })
            })
            .collect::<Result<Vec<_>, SpecError>>()?;
        if !mlps.contains(&LayerMlp::Moe) {
            return Err(self.unsupported(
                "decoder_sparse_step",
                &Value::from(step),
                format!(
                    "with mlp_only_layers {only:?} it leaves no layer with routed experts; \
                     TileFlow serves models with routed experts"
                ),
            ));
        }
        Ok(mlps)
    }

    /// `layer_types` as a list of strings, if given (and of the right length).
    fn layer_types(&self, num_layers: usize) -> Result<Option<Vec<&'a str>>, SpecError> {
        let items = match self.get("layer_types") {
            None => return Ok(None),
            Some(Value::Array(items)) => items,
            Some(v) => return Err(self.invalid("layer_types", format!("must be a list, got {v}"))),
        };
        let types = items
            .iter()
            .map(|v| {
                let t = v.as_str().ok_or_else(|| {
                    self.invalid("layer_types", format!("must list strings, got {v}"))
                })?;
                if t != FULL_ATTENTION && t != SLIDING_ATTENTION {
                    return Err(self.unsupported(
                        "layer_types",
                        v,
                        "layer types are full_attention and sliding_attention",
                    ));
                }
                Ok(t)
            })
            .collect::<Result<Vec<_>, _>>()?;
        if types.len() != num_layers {
            return Err(self.invalid(
                "layer_types",
                format!(
                    "has {} entries but num_hidden_layers is {num_layers}",
                    types.len()
                ),
            ));
        }
        Ok(Some(types))
    }

    /// A positive `sliding_window`, or `None` when it is absent or null.
    fn window(&self) -> Result<Option<usize>, SpecError> {
        match self.usize_opt("sliding_window")? {
            Some(0) => Err(self.invalid("sliding_window", "must be positive")),
            w => Ok(w),
        }
    }

    /// Each layer's sliding window, as transformers 5 sets it per family:
    ///
    /// - Mixtral: every layer, when `sliding_window` is not null.
    /// - Qwen3-MoE: every layer, when `use_sliding_window` and `sliding_window` is not null
    ///   (`max_window_layers` is not read).
    /// - OLMoE: none (its mask is always the causal one).
    /// - Qwen2-MoE: the layers `layer_types` marks `sliding_attention`; without `layer_types`,
    ///   the even layers below `max_window_layers` when `use_sliding_window`.
    ///
    /// Only Qwen2-MoE reads `layer_types`; for the others a `layer_types` that disagrees with
    /// the above is an error rather than silently ignored.
    fn layer_windows(
        &self,
        family: Family,
        num_layers: usize,
    ) -> Result<Vec<Option<usize>>, SpecError> {
        let types = self.layer_types(num_layers)?;
        let windows = match family {
            Family::Mixtral => vec![self.window()?; num_layers],
            Family::Olmoe => vec![None; num_layers],
            Family::Qwen3Moe => {
                let w = if self.bool_or("use_sliding_window", false)? {
                    self.window()?
                } else {
                    None
                };
                vec![w; num_layers]
            }
            Family::Qwen2Moe => return self.qwen2_windows(types.as_deref(), num_layers),
        };
        if let Some(types) = types {
            if let Some(i) =
                (0..num_layers).find(|&i| (types[i] == SLIDING_ATTENTION) != windows[i].is_some())
            {
                return Err(self.unsupported(
                    "layer_types",
                    &Value::String(types[i].into()),
                    format!(
                        "transformers does not read layer_types for {}, and at layer {i} it \
                         disagrees with sliding_window / use_sliding_window",
                        family.model_type()
                    ),
                ));
            }
        }
        Ok(windows)
    }

    fn qwen2_windows(
        &self,
        types: Option<&[&str]>,
        num_layers: usize,
    ) -> Result<Vec<Option<usize>>, SpecError> {
        let use_sliding = self.bool_or("use_sliding_window", false)?;
        let sliding: Vec<bool> = match types {
            Some(types) => types.iter().map(|t| *t == SLIDING_ATTENTION).collect(),
            None if !use_sliding => vec![false; num_layers],
            None => {
                let below = self.usize("max_window_layers")?;
                (0..num_layers).map(|i| i % 2 == 0 && i < below).collect()
            }
        };
        let Some(first) = sliding.iter().position(|&s| s) else {
            return Ok(vec![None; num_layers]);
        };
        // transformers 5 uses a window of 0 (every key masked) unless use_sliding_window.
        if !use_sliding {
            return Err(self.unsupported(
                "layer_types",
                &Value::String(SLIDING_ATTENTION.into()),
                format!(
                    "layer {first} is sliding_attention but use_sliding_window is false, which \
                     makes its window 0"
                ),
            ));
        }
        let window = self
            .window()?
            .ok_or_else(|| self.missing("sliding_window"))?;
        Ok(sliding.iter().map(|&s| s.then_some(window)).collect())
    }
}
