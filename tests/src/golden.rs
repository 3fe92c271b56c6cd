//! The golden cases of the fixtures (made by HF transformers) and the comparison of a
//! continuation the daemon returned with them or with another run.

use serde_json::Value;

use crate::fixture;

/// The largest difference allowed between two logprobs of the same token.
pub const LOGPROB_TOLERANCE: f64 = 1e-4;

/// One golden case: a prompt and transformers' greedy continuation.
#[derive(Debug, Clone)]
pub struct GoldenCase {
    /// The prompt as text (None for a chat case).
    pub prompt: Option<String>,
    /// The chat messages (for a chat case).
    pub chat_messages: Option<Value>,
    /// The prompt's token ids (for a chat case: the rendered template's).
    pub prompt_ids: Vec<u32>,
    /// The continuation: greedy tokens with their logprobs and top 5.
    pub continuation: Continuation,
    /// The continuation's text.
    pub text: String,
}

/// Generated tokens, the logprob of each, and the top alternatives at each step (id, logprob).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Continuation {
    /// Token ids.
    pub tokens: Vec<u32>,
    /// Logprob of each chosen token.
    pub logprobs: Vec<f64>,
    /// Top alternatives per step, most likely first.
    pub top: Vec<Vec<(u32, f64)>>,
}

fn u32s(v: &Value) -> Vec<u32> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    x.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or_else(|| panic!("not a token id: {x}"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A fixture's `golden.json`.
pub fn golden(family: &str) -> Value {
    let path = fixture(family).join("golden.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A fixture's golden cases.
pub fn golden_cases(family: &str) -> Vec<GoldenCase> {
    let g = golden(family);
    g["cases"]
        .as_array()
        .unwrap_or_else(|| panic!("{family}: golden.json has no cases"))
        .iter()
        .map(|c| GoldenCase {
            prompt: c["prompt"].as_str().map(str::to_string),
            chat_messages: c.get("chat_messages").cloned(),
            prompt_ids: u32s(&c["prompt_ids"]),
            continuation: Continuation {
                tokens: u32s(&c["tokens"]),
                logprobs: c["logprobs"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_f64).collect())
                    .unwrap_or_default(),
                top: c["top_logprobs"]
                    .as_array()
                    .map(|steps| {
                        steps
                            .iter()
                            .map(|step| {
                                step.as_array()
                                    .map(|e| {
                                        e.iter()
                                            .map(|p| {
                                                let id = p[0].as_u64().unwrap_or(u64::MAX);
                                                (
                                                    u32::try_from(id).unwrap_or(u32::MAX),
                                                    p[1].as_f64().unwrap_or(f64::NAN),
                                                )
                                            })
                                            .collect()
                                    })
                                    .unwrap_or_default()
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            },
            text: c["text"].as_str().unwrap_or_default().to_string(),
        })
        .collect()
}

/// Parses `token_id:N`, as `return_tokens_as_token_ids` renders tokens.
pub fn token_id(key: &str) -> u32 {
    key.strip_prefix("token_id:")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{key:?} is not a `token_id:N` key"))
}

impl Continuation {
    /// The generated part of a `/v1/completions` choice asked with `logprobs` and
    /// `return_tokens_as_token_ids` (with `echo`, the first `skip` entries are the prompt's).
    pub fn from_completion_choice(choice: &Value, skip: usize) -> Continuation {
        let lp = &choice["logprobs"];
        let tokens = lp["tokens"]
            .as_array()
            .unwrap_or_else(|| panic!("no logprobs.tokens in {choice}"));
        let mut c = Continuation::default();
        for (i, t) in tokens.iter().enumerate().skip(skip) {
            c.tokens.push(token_id(t.as_str().unwrap_or_default()));
            c.logprobs.push(
                lp["token_logprobs"][i]
                    .as_f64()
                    .unwrap_or_else(|| panic!("token_logprobs[{i}] is not a number: {lp}")),
            );
            let map = lp["top_logprobs"][i]
                .as_object()
                .unwrap_or_else(|| panic!("top_logprobs[{i}] is not an object: {lp}"));
            let mut top: Vec<(u32, f64)> = map
                .iter()
                .map(|(k, v)| (token_id(k), v.as_f64().unwrap_or(f64::NAN)))
                .collect();
            top.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            c.top.push(top);
        }
        c
    }

    /// Panics (naming `what`) unless the tokens are equal and every logprob, chosen and top,
    /// is within [`LOGPROB_TOLERANCE`]. Alternatives are matched by id, so ties may reorder.
    pub fn assert_matches(&self, expected: &Continuation, what: &str) {
        self.assert_within(expected, what, LOGPROB_TOLERANCE);
    }

    /// As [`Continuation::assert_matches`] with another tolerance; returns the largest |Δ|.
    pub fn assert_within(&self, expected: &Continuation, what: &str, tolerance: f64) -> f64 {
        assert_eq!(self.tokens, expected.tokens, "{what}: tokens differ");
        assert_eq!(
            self.logprobs.len(),
            expected.logprobs.len(),
            "{what}: logprob count"
        );
        let mut worst = 0f64;
        for (step, (got, want)) in self.logprobs.iter().zip(&expected.logprobs).enumerate() {
            let d = (got - want).abs();
            assert!(
                d <= tolerance,
                "{what}: step {step}: logprob {got} vs {want} (|Δ| {d:.2e})"
            );
            worst = worst.max(d);
        }
        assert_eq!(self.top.len(), expected.top.len(), "{what}: top steps");
        for (step, (got, want)) in self.top.iter().zip(&expected.top).enumerate() {
            assert_eq!(
                got.len(),
                want.len(),
                "{what}: step {step}: {got:?} vs {want:?}"
            );
            for &(id, lp) in want {
                let other = got
                    .iter()
                    .find(|(g, _)| *g == id)
                    .map(|&(_, l)| l)
                    .unwrap_or_else(|| {
                        panic!("{what}: step {step}: token {id} missing from top {got:?}")
                    });
                let d = (other - lp).abs();
                assert!(
                    d <= tolerance,
                    "{what}: step {step}: top token {id}: {other} vs {lp} (|Δ| {d:.2e})"
                );
                worst = worst.max(d);
            }
        }
        worst
    }
}
