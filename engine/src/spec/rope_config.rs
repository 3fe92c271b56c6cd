//! The rotary embedding of a `config.json`, read as transformers 5 standardises it
//! (`RotaryEmbeddingConfigMixin` in `modeling_rope_utils.py`).

use serde_json::{Map, Value};

use super::config::Config;
use super::SpecError;
use crate::rope::{RopeScaling, RopeSpec};

/// transformers' `default_theta`.
const DEFAULT_THETA: f64 = 10_000.0;

/// A RoPE parameters object and the config.json field it came from.
type RopeParams<'m> = (&'static str, &'m Map<String, Value>);

/// Keys of a per-layer-type `rope_parameters` (one dict per attention type).
const LAYER_TYPE_KEYS: [&str; 2] = ["full_attention", "sliding_attention"];

impl Config<'_> {
    /// The RoPE parameters object and the field it came from. transformers 5 takes a non-empty
    /// `rope_scaling` (the hub's spelling) over `rope_parameters` (the one it writes).
    fn rope_params(&self) -> Result<Option<RopeParams<'_>>, SpecError> {
        for field in ["rope_scaling", "rope_parameters"] {
            match self.get(field) {
                None => {}
                Some(Value::Object(m)) if m.is_empty() => {}
                Some(Value::Object(m)) => return Ok(Some((field, m))),
                Some(v) => {
                    return Err(self.invalid(field, format!("must be an object, got {v}")));
                }
            }
        }
        Ok(None)
    }

    pub(super) fn rope(&self, head_dim: usize, max_pos: usize) -> Result<RopeSpec, SpecError> {
        let params = self.rope_params()?;
        if let Some((field, m)) = params {
            if let Some((key, v)) = m
                .iter()
                .find(|(k, v)| LAYER_TYPE_KEYS.contains(&k.as_str()) || v.is_object())
            {
                return Err(self.unsupported(
                    &format!("{field}.{key}"),
                    v,
                    "per-layer-type RoPE parameters are not implemented",
                ));
            }
        }
        let num = |key: &str| -> Result<Option<f64>, SpecError> {
            match params {
                None => Ok(None),
                Some((field, m)) => match m.get(key).filter(|v| !v.is_null()) {
                    None => Ok(None),
                    Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                        self.invalid(
                            &format!("{field}.{key}"),
                            format!("must be a number, got {v}"),
                        )
                    }),
                },
            }
        };
        // A value inside the parameters wins over the top-level one.
        let theta = match num("rope_theta")? {
            Some(t) => t,
            None => self.f64_opt("rope_theta")?.unwrap_or(DEFAULT_THETA),
        };
        if !(theta.is_finite() && theta > 1.0) {
            return Err(self.invalid("rope_theta", format!("must be > 1, got {theta}")));
        }
        let scaling = match params {
            None => RopeScaling::Default,
            Some((field, m)) => self.rope_scaling(field, m, max_pos)?,
        };
        if scaling != RopeScaling::Default {
            // The scaled RoPE functions rotate only int(head_dim * partial_rotary_factor)
            // dimensions; the families' default RoPE ignores the factor.
            let (name, factor) = match num("partial_rotary_factor")? {
                Some(f) => (
                    format!("{}.partial_rotary_factor", params.map_or("", |p| p.0)),
                    Some(f),
                ),
                None => (
                    "partial_rotary_factor".to_string(),
                    self.f64_opt("partial_rotary_factor")?,
                ),
            };
            if let Some(f) = factor.filter(|f| *f != 1.0) {
                return Err(self.unsupported(
                    &name,
                    &Value::from(f),
                    "only full rotary (1.0) is implemented",
                ));
            }
        }
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
        let kind = match m.get("rope_type").or_else(|| m.get("type")) {
            None | Some(Value::Null) => "default",
            Some(v) => v.as_str().ok_or_else(|| {
                self.invalid(
                    &format!("{field}.rope_type"),
                    format!("must be a string, got {v}"),
                )
            })?,
        };
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
        let positive = |key: &str, v: f64| -> Result<f64, SpecError> {
            if !(v.is_finite() && v > 0.0) {
                return Err(self.invalid(
                    &format!("{field}.{key}"),
                    format!("must be positive, got {v}"),
                ));
            }
            Ok(v)
        };
        let factor = |key: &str| -> Result<f64, SpecError> {
            let f = num(key)?.ok_or_else(|| self.missing(&format!("{field}.{key}")))?;
            positive(key, f)
        };
        // The pretraining context of llama3 and yarn: a top-level field wins (Phi-3 style),
        // then the parameters' own, then max_position_embeddings.
        let original = || -> Result<f64, SpecError> {
            const KEY: &str = "original_max_position_embeddings";
            match self.f64_opt(KEY)? {
                Some(o) => {
                    if !(o.is_finite() && o > 0.0) {
                        return Err(self.invalid(KEY, format!("must be positive, got {o}")));
                    }
                    Ok(o)
                }
                None => positive(KEY, num(KEY)?.unwrap_or(max_pos as f64)),
            }
        };
        match kind {
            "default" => Ok(RopeScaling::Default),
            "linear" => Ok(RopeScaling::Linear {
                factor: factor("factor")?,
            }),
            "yarn" => {
                let original = original()?;
                // transformers 5 uses an explicit `factor` (warning when it disagrees with
                // max_position_embeddings / original); `factor: null` means that ratio.
                let factor = match m.get("factor") {
                    None => return Err(self.missing(&format!("{field}.factor"))),
                    Some(Value::Null) => max_pos as f64 / original,
                    Some(_) => factor("factor")?,
                };
                // `truncate: null` is falsy in transformers' `if truncate:`.
                let truncate = match m.get("truncate") {
                    None => true,
                    Some(Value::Null) => false,
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
                original_max_position_embeddings: original()?,
            }),
            other => Err(self.unsupported(
                &format!("{field}.rope_type"),
                &Value::String(other.to_string()),
                "supported rope types are default, linear, yarn and llama3",
            )),
        }
    }
}
