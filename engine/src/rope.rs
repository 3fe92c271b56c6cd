//! Rotary position embeddings and their scaling variants, computed as transformers computes
//! them (float32 inverse frequencies, cos/sin scaled by the attention factor).

use serde::{Deserialize, Serialize};

/// How the inverse frequencies are scaled for longer contexts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "rope_type", deny_unknown_fields)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// YaRN (NTK-by-parts with an attention temperature).
    Yarn {
        /// Context extension factor (already the ratio of contexts where transformers uses it).
        factor: f64,
        /// The pretraining context.
        original_max_position_embeddings: f64,
        /// cos/sin multiplier; derived from `factor` (and mscales) when absent.
        attention_factor: Option<f64>,
        /// High-frequency boundary, in rotations.
        beta_fast: f64,
        /// Low-frequency boundary, in rotations.
        beta_slow: f64,
        /// DeepSeek-style mscale numerator.
        mscale: Option<f64>,
        /// DeepSeek-style mscale denominator.
        mscale_all_dim: Option<f64>,
        /// Round the correction range outwards to whole dimensions.
        truncate: bool,
    },
    /// Llama 3.1 frequency smoothing.
    Llama3 {
        /// Scale of low frequencies.
        factor: f64,
        /// Low-frequency wavelength boundary factor.
        low_freq_factor: f64,
        /// High-frequency wavelength boundary factor.
        high_freq_factor: f64,
        /// The pretraining context.
        original_max_position_embeddings: f64,
    },
}

/// A model's rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeSpec {
    /// Base wavelength.
    pub theta: f64,
    /// Rotated width (the whole head).
    pub head_dim: usize,
    /// Scaling variant.
    pub scaling: RopeScaling,
}

impl RopeSpec {
    /// Inverse frequencies (head_dim / 2 of them) and the factor that multiplies cos and sin.
    pub fn inv_freq(&self) -> (Vec<f32>, f32) {
        let dim = self.head_dim;
        let base = self.theta as f32;
        let plain: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        match self.scaling {
            RopeScaling::Default => (plain, 1.0),
            RopeScaling::Linear { factor } => {
                (plain.iter().map(|f| f / factor as f32).collect(), 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                attention_factor,
                beta_fast,
                beta_slow,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| {
                    if scale <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * scale.ln() + 1.0
                    }
                };
                let attention =
                    attention_factor.unwrap_or_else(|| match (mscale, mscale_all_dim) {
                        (Some(m), Some(a)) if m != 0.0 && a != 0.0 => {
                            get_mscale(factor, m) / get_mscale(factor, a)
                        }
                        _ => get_mscale(factor, 1.0),
                    });
                let base64 = self.theta;
                let correction_dim = |rotations: f64| {
                    (dim as f64
                        * (original_max_position_embeddings
                            / (rotations * 2.0 * std::f64::consts::PI))
                            .ln())
                        / (2.0 * base64.ln())
                };
                let (mut low, mut high) = (correction_dim(beta_fast), correction_dim(beta_slow));
                if truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let high = high.min(dim as f64 - 1.0);
                let (low, high) = (
                    low as f32,
                    if low == high { high + 0.001 } else { high } as f32,
                );
                let inv = plain
                    .iter()
                    .enumerate()
                    .map(|(i, &extrapolation)| {
                        // pos_freqs = base^(2i/dim); extrapolation = 1/pos_freqs.
                        let pos_freq = base.powf((2 * i) as f32 / dim as f32);
                        let interpolation = 1.0 / (factor as f32 * pos_freq);
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation_factor = 1.0 - ramp;
                        interpolation * (1.0 - extrapolation_factor)
                            + extrapolation * extrapolation_factor
                    })
                    .collect();
                (inv, attention as f32)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                let inv = plain
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                        let scaled = if wavelen > low_wavelen {
                            f / factor as f32
                        } else {
                            f
                        };
                        if wavelen < high_wavelen || wavelen > low_wavelen {
                            scaled
                        } else {
                            let smooth = ((old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor))
                                as f32;
                            (1.0 - smooth) * scaled / factor as f32 + smooth * scaled
                        }
                    })
                    .collect();
                (inv, 1.0)
            }
        }
    }

    /// The table of cos and sin per position used by attention.
    pub fn table(&self) -> RopeTable {
        let (inv_freq, scale) = self.inv_freq();
        RopeTable { inv_freq, scale }
    }
}

/// Precomputed inverse frequencies; cos/sin are made per position on demand.
#[derive(Debug, Clone)]
pub struct RopeTable {
    inv_freq: Vec<f32>,
    scale: f32,
}

impl RopeTable {
    /// The inverse frequencies, `head_dim / 2` of them (a device backend computes cos and sin
    /// from these as [`RopeTable::apply`] does).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The factor that multiplies cos and sin (YaRN's attention temperature; 1 otherwise).
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Rotates each `head_dim`-wide head of `x` in place for position `pos`
    /// (transformers' `x * cos + rotate_half(x) * sin`).
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.inv_freq.len();
        let (cos, sin): (Vec<f32>, Vec<f32>) = self
            .inv_freq
            .iter()
            .map(|f| {
                let angle = f * pos as f32;
                (angle.cos() * self.scale, angle.sin() * self.scale)
            })
            .unzip();
        for head in x.chunks_exact_mut(2 * half) {
            let (a, b) = head.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1 * cos[i] - x2 * sin[i];
                b[i] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_frequencies_and_rotation_preserve_norm() {
        let spec = RopeSpec {
            theta: 10000.0,
            head_dim: 8,
            scaling: RopeScaling::Default,
        };
        let (inv, scale) = spec.inv_freq();
        assert_eq!(inv.len(), 4);
        assert_eq!(inv[0], 1.0);
        assert!((inv[1] - 0.1).abs() < 1e-7);
        assert_eq!(scale, 1.0);
        let mut x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let n0: f32 = x.iter().map(|v| v * v).sum();
        spec.table().apply(&mut x, 7);
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_scales_low_ones() {
        let spec = RopeSpec {
            theta: 10000.0,
            head_dim: 32,
            scaling: RopeScaling::Yarn {
                factor: 4.0,
                original_max_position_embeddings: 64.0,
                attention_factor: None,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: None,
                mscale_all_dim: None,
                truncate: true,
            },
        };
        let plain = RopeSpec {
            scaling: RopeScaling::Default,
            ..spec
        }
        .inv_freq()
        .0;
        let (inv, scale) = spec.inv_freq();
        assert_eq!(inv[0], plain[0]);
        assert!((inv[15] - plain[15] / 4.0).abs() < 1e-9);
        assert!((scale - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
    }
}
