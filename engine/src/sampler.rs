//! Choosing the next token from the model's logits, and deciding when a sequence is finished.
//!
//! [`Sampler`] applies temperature, top-k and top-p in that order (as HF transformers and vLLM
//! do) and reports log-probabilities under the unmodified model distribution, which is what the
//! OpenAI API's `logprobs` means. [`StopChecker`] turns sampled tokens and their text into
//! finish reasons and the text that may be shown.

mod rng;
mod stop;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use rng::Xoshiro256;
pub use stop::{FinishReason, StopChecker, StopReason, StopStep};

/// Most alternatives one position may report (the OpenAI API's limit).
pub const MAX_LOGPROBS: usize = 20;

/// Errors of sampling parameters or of the logits handed to the sampler.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplerError {
    /// A sampling parameter is out of range.
    #[error("invalid sampling parameter `{field}`: {reason}")]
    InvalidParam {
        /// The parameter's name as the API spells it (`stop[1]` for an element).
        field: String,
        /// What is allowed.
        reason: String,
    },
    /// The logits slice is empty.
    #[error("cannot sample from an empty logits vector")]
    EmptyLogits,
    /// The logits vector is longer than token ids can count.
    #[error("logits vector of length {len} exceeds the u32 token id range")]
    TooManyLogits {
        /// Length of the logits vector.
        len: usize,
    },
    /// A logit is NaN or +∞ (the forward pass overflowed).
    #[error("logit of token {id} is {value}, not a finite number")]
    NonFiniteLogit {
        /// The token whose logit is bad.
        id: usize,
        /// The bad value.
        value: f32,
    },
    /// Every logit is −∞, so no token can be chosen.
    #[error("every one of the {vocab} logits is -inf")]
    AllMasked {
        /// Length of the logits vector.
        vocab: usize,
    },
}

/// How one sequence is sampled and when it stops. Defaults are the OpenAI API's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens; 0 turns the filter off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 is off.
    pub top_p: f32,
    /// Seed of the sequence's random stream; `None` draws one from OS entropy.
    pub seed: Option<u64>,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Strings that end generation; the text is cut before the first one.
    pub stop: Vec<String>,
    /// Token ids that end generation (in addition to EOS); their text is not returned.
    pub stop_token_ids: Vec<u32>,
    /// Report this many most likely alternatives per position (0..=20); `None` reports none.
    pub logprobs: Option<usize>,
    /// Keep generating past EOS tokens (benchmarks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            max_tokens: 16,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            logprobs: None,
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding of at most `max_tokens` tokens.
    pub fn greedy(max_tokens: u32) -> Self {
        Self {
            temperature: 0.0,
            max_tokens,
            ..Self::default()
        }
    }

    /// Checks every field's range; the error names the first bad field.
    pub fn validate(&self) -> Result<(), SamplerError> {
        let bad = |field: &str, reason: &str| {
            Err(SamplerError::InvalidParam {
                field: field.to_owned(),
                reason: reason.to_owned(),
            })
        };
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad("temperature", "must be a finite number >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if self.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1");
        }
        if self.logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
            return bad("logprobs", "must be between 0 and 20");
        }
        if let Some(i) = self.stop.iter().position(String::is_empty) {
            return bad(&format!("stop[{i}]"), "must not be empty");
        }
        Ok(())
    }

    fn is_greedy(&self) -> bool {
        // Below this the distribution is argmax in f64 for any realistic logit gap.
        self.temperature < 1e-5
    }
}

/// One sampled position.
#[derive(Debug, Clone, PartialEq)]
pub struct SampledToken {
    /// The chosen token.
    pub id: u32,
    /// Its log-probability under the model's distribution (log-softmax of the raw logits,
    /// before temperature and filtering).
    pub logprob: f32,
    /// The `logprobs` most likely tokens and their log-probabilities, most likely first, ties
    /// broken by the lower id; empty when `logprobs` is `None` or 0.
    pub top_logprobs: Vec<(u32, f32)>,
}

/// Samples the tokens of one sequence; owns its random stream so that a seeded sequence is
/// reproducible regardless of what else is batched with it.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Xoshiro256,
    /// Reused candidate buffer (ids of the tokens still in play).
    candidates: Vec<u32>,
    /// Reused per-token weights of the current step.
    weights: Vec<f32>,
}

impl Sampler {
    /// A sampler for `params` (validated here); seeded from `params.seed` or OS entropy.
    pub fn new(params: SamplingParams) -> Result<Self, SamplerError> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => Xoshiro256::from_seed(seed),
            None => Xoshiro256::from_entropy(),
        };
        Ok(Self {
            params,
            rng,
            candidates: Vec::new(),
            weights: Vec::new(),
        })
    }

    /// The parameters this sampler was made with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from one position's logits (one per vocabulary entry; −∞ masks
    /// a token).
    pub fn sample(&mut self, logits: &[f32]) -> Result<SampledToken, SamplerError> {
        self.sample_with(logits, None)
    }

    /// [`Sampler::sample`] with the row's summary when the backend computed it (it must be
    /// `LogitSummary::scan` of these logits, up to rounding in the sum); scanned here when
    /// `None`.
    pub fn sample_with(
        &mut self,
        logits: &[f32],
        summary: Option<&LogitSummary>,
    ) -> Result<SampledToken, SamplerError> {
        let stats = match summary {
            Some(s) if (s.argmax as usize) < logits.len() => *s,
            _ => LogitSummary::scan(logits)?,
        };
        let id = if self.params.is_greedy() {
            stats.argmax
        } else {
            self.draw(logits, &stats)
        };
        let logprob = stats.logprob(logits[id as usize]);
        let top_logprobs = match self.params.logprobs {
            Some(n) if n > 0 => top_n(logits, n)
                .into_iter()
                .map(|t| (t, stats.logprob(logits[t as usize])))
                .collect(),
            _ => Vec::new(),
        };
        Ok(SampledToken {
            id,
            logprob,
            top_logprobs,
        })
    }

    /// Temperature, then top-k, then top-p, then a draw from what is left.
    fn draw(&mut self, logits: &[f32], stats: &LogitSummary) -> u32 {
        // Relative weights after temperature, the most likely token weighing 1; computed once
        // per step (f32 exp, f64 sums) because every stage below reads them.
        let inv_t = 1.0 / self.params.temperature;
        self.weights.clear();
        self.weights
            .extend(logits.iter().map(|&x| ((x - stats.max) * inv_t).exp()));
        let weights = &self.weights;
        let weight = |id: u32| f64::from(weights[id as usize]);
        let top_p = f64::from(self.params.top_p);
        let top_k = self.params.top_k;
        let cands = &mut self.candidates;
        cands.clear();
        let target =
            if top_k > 0 && top_k < logits.len() {
                cands.extend(top_n(logits, top_k));
                cands.retain(|&id| logits[id as usize] > f32::NEG_INFINITY);
                top_p * cands.iter().map(|&id| weight(id)).sum::<f64>()
            } else if top_p < 1.0 {
                // The top-p set is a prefix of the tokens sorted by weight, so it lies within any
                // {weight >= cutoff} whose mass already reaches the target: sort only that set,
                // lowering the cutoff until it does. Same result as sorting everything.
                let all = || (0..logits.len()).filter_map(|i| u32::try_from(i).ok());
                let target = top_p * all().map(weight).sum::<f64>();
                let mut cutoff = 1e-4;
                loop {
                    cands.clear();
                    cands.extend(all().filter(|&id| {
                        logits[id as usize] > f32::NEG_INFINITY && weight(id) >= cutoff
                    }));
                    let mass: f64 = cands.iter().map(|&id| weight(id)).sum();
                    if mass >= target || cutoff == 0.0 {
                        break target;
                    }
                    cutoff = if cutoff < 1e-30 { 0.0 } else { cutoff * 1e-4 };
                }
            } else {
                cands.extend((0..logits.len()).filter_map(|i| {
                    let id = u32::try_from(i).ok()?;
                    (logits[i] > f32::NEG_INFINITY).then_some(id)
                }));
                f64::INFINITY
            };
        if top_p < 1.0 {
            cands.sort_unstable_by(|&a, &b| by_logit_desc(logits, a, b));
            let mut cum = 0.0;
            let mut keep = cands.len();
            for (i, &id) in cands.iter().enumerate() {
                cum += weight(id);
                if cum >= target {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep);
        }
        let total: f64 = cands.iter().map(|&id| weight(id)).sum();
        let u = self.rng.next_f64() * total;
        let mut cum = 0.0;
        for &id in cands.iter() {
            cum += weight(id);
            if u < cum {
                return id;
            }
        }
        // Rounding left `u` at the very top: the last candidate with weight is the answer.
        cands
            .iter()
            .rev()
            .copied()
            .find(|&id| weight(id) > 0.0)
            .unwrap_or(stats.argmax)
    }
}

/// Orders token ids by logit, largest first, ties by the lower id.
fn by_logit_desc(logits: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
    logits[b as usize]
        .total_cmp(&logits[a as usize])
        .then(a.cmp(&b))
}

/// Up to this many, [`top_n`] keeps a sorted list while scanning; beyond, it selects.
const SMALL_TOP_N: usize = 64;

/// The `n` ids with the largest logits, largest first, ties by the lower id.
fn top_n(logits: &[f32], n: usize) -> Vec<u32> {
    if n == 0 {
        return Vec::new();
    }
    if n > SMALL_TOP_N {
        let mut ids: Vec<u32> = (0..logits.len())
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        if n < ids.len() {
            ids.select_nth_unstable_by(n - 1, |&a, &b| by_logit_desc(logits, a, b));
            ids.truncate(n);
        }
        ids.sort_unstable_by(|&a, &b| by_logit_desc(logits, a, b));
        return ids;
    }
    let mut top: Vec<u32> = Vec::with_capacity(n + 1);
    for (i, &x) in logits.iter().enumerate() {
        let Ok(id) = u32::try_from(i) else { break };
        if top.len() == n {
            // Scanning in id order, an equal logit never beats an earlier (lower) id.
            if top.last().is_some_and(|&last| x <= logits[last as usize]) {
                continue;
            }
            top.pop();
        }
        let pos = top.partition_point(|&t| logits[t as usize] >= x);
        top.insert(pos, id);
    }
    top
}

/// What one pass over a row of logits tells: the argmax and the log-partition function. The
/// sampler scans for it ([`LogitSummary::scan`]) unless the backend that made the logits
/// already did ([`Sampler::sample_with`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LogitSummary {
    /// The first index of the largest logit.
    pub argmax: u32,
    /// The largest logit.
    pub max: f32,
    /// log Σ exp(logit): terms taken relative to the max (no overflow), summed in f64.
    pub log_sum_exp: f64,
}

/// Vocabularies from which [`LogitSummary::scan`] spreads over threads: below, one core's
/// vectorised passes (~80 µs for 50k logits) beat waking the pool twice a token.
const PARALLEL_SCAN: usize = 128 * 1024;
/// Logits per thread's share of a parallel scan.
const SCAN_CHUNK: usize = 8 * 1024;

impl LogitSummary {
    /// The summary of `logits`, or the error a bad row gets: empty, too long, a NaN or +∞
    /// (the first named), or every token masked.
    pub fn scan(logits: &[f32]) -> Result<Self, SamplerError> {
        if logits.is_empty() {
            return Err(SamplerError::EmptyLogits);
        }
        if u32::try_from(logits.len()).is_err() {
            return Err(SamplerError::TooManyLogits { len: logits.len() });
        }
        // Large vocabularies are scanned in chunks on rayon's pool; the chunks' results are
        // combined in order: the argmax and the first bad logit are the serial scan's, and the
        // sum (added chunk by chunk) is the same whatever the threads.
        let chunk = if logits.len() >= PARALLEL_SCAN {
            SCAN_CHUNK
        } else {
            logits.len()
        };
        let maxima: Vec<Result<(usize, f32), SamplerError>> = logits
            .par_chunks(chunk)
            .enumerate()
            .map(|(c, part)| chunk_max(c * chunk, part))
            .collect();
        let (mut argmax, mut max) = (0usize, f32::NEG_INFINITY);
        for m in maxima {
            let (i, x) = m?;
            if x > max {
                (argmax, max) = (i, x);
            }
        }
        if max == f32::NEG_INFINITY {
            return Err(SamplerError::AllMasked {
                vocab: logits.len(),
            });
        }
        let sums: Vec<f64> = logits
            .par_chunks(chunk)
            .map(|part| sum_exp(part, max))
            .collect();
        let sum: f64 = sums.iter().sum();
        Ok(Self {
            argmax: u32::try_from(argmax).unwrap_or(0),
            max,
            log_sum_exp: f64::from(max) + sum.ln(),
        })
    }

    fn logprob(&self, logit: f32) -> f32 {
        (f64::from(logit) - self.log_sum_exp) as f32
    }
}

/// The first NaN or +∞ of `part` (token ids from `first`) as an error, else its largest logit
/// and where that first is. Branch-free folds the compiler vectorises, then one search.
fn chunk_max(first: usize, part: &[f32]) -> Result<(usize, f32), SamplerError> {
    let bad = |x: f32| x.is_nan() || x == f32::INFINITY;
    if part.iter().fold(false, |b, &x| b | bad(x)) {
        let i = part.iter().position(|&x| bad(x)).unwrap_or(0);
        return Err(SamplerError::NonFiniteLogit {
            id: first + i,
            value: part[i],
        });
    }
    let max = part.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x));
    let i = part.iter().position(|&x| x == max).unwrap_or(0);
    Ok((first + i, max))
}

/// Σ exp(x − max) over `part` (every x ≤ max), in f64: sixteen lanes the compiler vectorises,
/// each term from [`exp_nonpositive`]; terms below e^−87 (masked tokens among them) count as 0.
fn sum_exp(part: &[f32], max: f32) -> f64 {
    let term = |x: f32| {
        let d = x - max;
        let e = exp_nonpositive(d.max(-87.0));
        if d < -87.0 {
            0.0
        } else {
            e
        }
    };
    let mut lanes = [0f64; 16];
    let mut blocks = part.chunks_exact(16);
    for b in &mut blocks {
        let mut e = [0f32; 16];
        for (e, &x) in e.iter_mut().zip(b) {
            *e = term(x);
        }
        for (l, e) in lanes.iter_mut().zip(e) {
            *l += f64::from(e);
        }
    }
    let rest: f64 = blocks.remainder().iter().map(|&x| f64::from(term(x))).sum();
    lanes.iter().sum::<f64>() + rest
}

/// e^x for −87 ≤ x ≤ 0 within 1e-7 relative, in plain f32 arithmetic that vectorises (libm's
/// expf does not): x = n·ln 2 + y with |y| ≤ ln 2 / 2 (ln 2 split in two parts, so y is
/// exact to f32), e^y by its degree-7 Taylor polynomial, 2^n built in the exponent bits.
fn exp_nonpositive(x: f32) -> f32 {
    // Adding 1.5 · 2^23 rounds to an integer n, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let r = x * std::f32::consts::LOG2_E + ROUND;
    let n = r - ROUND;
    let y = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * y + c;
    }
    // r's bits are ROUND's plus n; n + 127 shifted into the exponent field is 2^n (n ≥ −126).
    let two_n = f32::from_bits(
        r.to_bits()
            .wrapping_add(127u32.wrapping_sub(ROUND.to_bits()))
            << 23,
    );
    p * two_n
}

#[cfg(test)]
mod tests;
