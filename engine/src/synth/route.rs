//! How a synthesized model routes: a routing subspace of the residual stream, and per-expert
//! biases calibrated so that expert popularity per layer follows Zipf's law.
//!
//! Scaling random router rows cannot do this. When hidden states are symmetric (h and -h
//! equally likely, as for random weights), the experts that win top-k for h lose it for -h,
//! so no expert is picked for more than half the tokens, whatever its row's scale; Zipf with
//! exponent 1 over 16 experts, top 4, asks 99 % and 63 % of the first two. Routers need a
//! bias, and real routers have none (`nn.Linear(bias=False)`), so the model carries one:
//!
//! * hidden channel 0 holds the constant [`BIAS_VALUE`] in every token's embedding, and
//!   channels `1..=E` a per-token Gaussian code (std [`CODE_STD`]);
//! * nothing writes to these `E + 1` channels: their rows of every `o_proj` and every down
//!   projection (routed, shared or dense) are zero, so the residual stream keeps the
//!   embedding's values there through every layer;
//! * layer L's router row of expert e reads channel 0 (weight ∝ bias_e) and the code
//!   channels through row e of a per-layer random orthogonal matrix (so the mixed codes are
//!   again iid N(0, 1), and nearly independent between layers), each weight divided by that
//!   layer's post-attention norm gain of its channel.
//!
//! The router input is `g ⊙ x / rms(x)`, so expert e's logit is
//! `SHARPNESS · CODE_STD · (bias_e + z_e) / rms(x)` with z iid N(0, 1) over tokens. The common
//! positive factor does not change the top-k, so which experts a token picks depends on the
//! token alone, with exactly the distribution the calibration assumes, at every layer and
//! depth; the biases are calibrated once per (experts, top-k, skew) by Monte Carlo.
//!
//! What this gives up: routing sees no context, so router look-ahead (layer L+1's router
//! applied to layer L's hidden state) is nearly exact on synthesized models (only the norm
//! gains differ), more accurate than on real ones. Popularity, not predictability, is what
//! these models are calibrated for.

use super::splitmix;
use crate::spec::ModelSpec;

/// Value of the bias channel (hidden channel 0) in every embedding row.
pub(super) const BIAS_VALUE: f32 = 0.577_350_26;
/// Standard deviation of the code channels of the embedding (that of uniform [-1, 1], like
/// the other channels).
pub(super) const CODE_STD: f32 = 0.577_350_26;
/// Router logit scale at unit RMS of the residual stream: routing is decisive, and the
/// combine weights are not all alike.
const SHARPNESS: f32 = 4.0;
/// The most probable expert is picked for at most this share of tokens.
const MAX_PICK: f64 = 0.99;

/// Hidden channels reserved for routing (bias + one code per expert): the first rows of
/// every matrix that writes the residual stream are zero.
pub(super) fn reserved_channels(spec: &ModelSpec) -> usize {
    spec.moe.num_experts + 1
}

/// The code of `token` in code channel `c` (hidden channel `1 + c`): N(0, CODE_STD²).
pub(super) fn code_value(stream: u64, token: usize, c: usize, experts: usize) -> f32 {
    let h = splitmix(stream ^ ((token * experts + c) as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (gaussian(h) as f32) * CODE_STD
}

/// A standard normal from 64 random bits (Box-Muller on two 32-bit uniforms).
fn gaussian(h: u64) -> f64 {
    let u1 = ((h >> 32) as f64 + 0.5) / (1u64 << 32) as f64;
    let u2 = (h & 0xFFFF_FFFF) as f64 / (1u64 << 32) as f64;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A permutation of `0..n` drawn from `seed` (Fisher-Yates).
pub(super) fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    let mut s = seed;
    for i in (1..n).rev() {
        s = splitmix(s);
        p.swap(i, (s % (i as u64 + 1)) as usize);
    }
    p
}

/// A random orthogonal `n × n` matrix, row-major (Gram-Schmidt on Gaussian rows).
pub(super) fn orthogonal(n: usize, seed: u64) -> Vec<f64> {
    let mut q: Vec<f64> = (0..n * n)
        .map(|i| {
            gaussian(splitmix(
                seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ))
        })
        .collect();
    for r in 0..n {
        let (done, rest) = q.split_at_mut(r * n);
        let row = &mut rest[..n];
        // Twice, for orthogonality to rounding.
        for _ in 0..2 {
            for prev in done.chunks_exact(n) {
                let dot: f64 = prev.iter().zip(row.iter()).map(|(a, b)| a * b).sum();
                row.iter_mut().zip(prev).for_each(|(x, p)| *x -= dot * p);
            }
        }
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
    q
}

/// Router rows of one layer, `[experts, hidden]` row-major: expert e reads the bias channel
/// with weight ∝ `bias[rank[e]]` and the code channels through row e of the orthogonal `mix`
/// (so its code is again N(0, 1) and nearly independent of other layers' codes), each weight
/// divided by the layer's post-attention norm gain of its channel, `gains`.
pub(super) fn router_rows(
    hidden: usize,
    bias: &[f64],
    rank: &[usize],
    mix: &[f64],
    gains: &[f32],
) -> Vec<f32> {
    let e = rank.len();
    let mut w = vec![0f32; e * hidden];
    for ((row, &r), m) in w
        .chunks_exact_mut(hidden)
        .zip(rank)
        .zip(mix.chunks_exact(e))
    {
        row[0] = SHARPNESS * bias[r] as f32 / gains[0];
        for (c, &q) in m.iter().enumerate() {
            row[1 + c] = SHARPNESS * q as f32 / gains[1 + c];
        }
    }
    w
}

/// Pick probabilities by popularity rank: ∝ 1 / rank^skew, summing to `k`, none above
/// [`MAX_PICK`] (the excess goes to the others in proportion, as a cap must).
pub(super) fn zipf_targets(experts: usize, k: usize, skew: f64) -> Vec<f64> {
    let w: Vec<f64> = (0..experts).map(|r| (r as f64 + 1.0).powf(-skew)).collect();
    let mut capped = vec![false; experts];
    loop {
        let n_capped = capped.iter().filter(|&&c| c).count();
        let free: f64 = (0..experts).filter(|&r| !capped[r]).map(|r| w[r]).sum();
        let c = (k as f64 - n_capped as f64 * MAX_PICK) / free;
        let mut changed = false;
        for r in 0..experts {
            if !capped[r] && c * w[r] > MAX_PICK {
                capped[r] = true;
                changed = true;
            }
        }
        if !changed {
            return (0..experts)
                .map(|r| if capped[r] { MAX_PICK } else { c * w[r] })
                .collect();
        }
    }
}

/// Biases b such that, with logits `b[r] + z[r]` and z iid N(0, 1), rank r is in the top k
/// with probability `target[r]`. Damped fixed-point iteration in logit space on Monte Carlo
/// frequencies over one fixed sample (common random numbers, so it settles).
pub(super) fn zipf_biases(target: &[f64], k: usize, seed: u64) -> Vec<f64> {
    const SAMPLES: usize = 8192;
    const ROUNDS: usize = 120;
    let e = target.len();
    if target.iter().all(|&t| (t - target[0]).abs() < 1e-12) {
        return vec![0.0; e];
    }
    let z: Vec<f64> = (0..SAMPLES * e)
        .map(|i| {
            gaussian(splitmix(
                seed ^ (i as u64).wrapping_mul(0xD1B5_4A32_D192_ED03),
            ))
        })
        .collect();
    let logit = |p: f64| {
        let p = p.clamp(1e-9, 1.0 - 1e-9);
        (p / (1.0 - p)).ln()
    };
    let mut bias = vec![0f64; e];
    let mut v = vec![0f64; e];
    let mut order: Vec<usize> = (0..e).collect();
    for _ in 0..ROUNDS {
        let mut hits = vec![0u32; e];
        for sample in z.chunks_exact(e) {
            for ((vi, zi), b) in v.iter_mut().zip(sample).zip(&bias) {
                *vi = b + zi;
            }
            order.select_nth_unstable_by(k - 1, |&a, &b| v[b].total_cmp(&v[a]));
            for &i in &order[..k] {
                hits[i] += 1;
            }
        }
        for (b, (&h, &t)) in bias.iter_mut().zip(hits.iter().zip(target)) {
            let freq = (h as f64 + 0.5) / (SAMPLES as f64 + 1.0);
            *b = (*b + 0.5 * (logit(t) - logit(freq))).clamp(-30.0, 30.0);
        }
        let mean = bias.iter().sum::<f64>() / e as f64;
        bias.iter_mut().for_each(|b| *b -= mean);
    }
    bias
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_zipf_under_the_cap_and_sum_to_k() {
        let p = zipf_targets(16, 4, 1.0);
        assert!((p.iter().sum::<f64>() - 4.0).abs() < 1e-9);
        assert_eq!(p[0], MAX_PICK);
        for r in 1..15 {
            let ratio = p[r] / p[r + 1];
            let want = (r as f64 + 2.0) / (r as f64 + 1.0);
            assert!((ratio - want).abs() < 1e-9, "rank {r}: {ratio} vs {want}");
        }
        let flat = zipf_targets(64, 8, 0.0);
        assert!(flat.iter().all(|&x| (x - 0.125).abs() < 1e-12));
        let steep = zipf_targets(8, 2, 8.0);
        assert!((steep.iter().sum::<f64>() - 2.0).abs() < 1e-9);
        assert!(steep.iter().all(|&x| x <= MAX_PICK));
    }

    #[test]
    fn mixing_matrices_are_orthogonal() {
        let n = 24;
        let q = orthogonal(n, 5);
        for a in 0..n {
            for b in 0..n {
                let dot: f64 = (0..n).map(|i| q[a * n + i] * q[b * n + i]).sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-12, "rows {a}, {b}: {dot}");
            }
        }
    }

    /// The calibrated biases give the target frequencies on fresh samples.
    #[test]
    fn biases_give_the_target_pick_rates() {
        let (e, k) = (16, 4);
        let target = zipf_targets(e, k, 1.0);
        let bias = zipf_biases(&target, k, 7);
        let n = 20_000;
        let mut hits = vec![0usize; e];
        let mut order: Vec<usize> = (0..e).collect();
        for t in 0..n {
            let v: Vec<f64> = (0..e)
                .map(|c| bias[c] + code_value(99, t, c, e) as f64 / CODE_STD as f64)
                .collect();
            order.select_nth_unstable_by(k - 1, |&a, &b| v[b].total_cmp(&v[a]));
            order[..k].iter().for_each(|&i| hits[i] += 1);
        }
        for r in 0..e {
            let freq = hits[r] as f64 / n as f64;
            let tol = 4.0 * (target[r] * (1.0 - target[r]) / n as f64).sqrt() + 0.01;
            assert!(
                (freq - target[r]).abs() < tol,
                "rank {r}: picked {freq:.4}, target {:.4}",
                target[r]
            );
        }
        assert_eq!(zipf_biases(&zipf_targets(e, k, 0.0), k, 7), vec![0.0; e]);
    }
}
