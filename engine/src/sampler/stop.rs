//! When a sequence is finished, and which of its text may be shown yet.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::SamplingParams;

/// Why a sequence ended, as the OpenAI API's `finish_reason` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS token, a stop token id or a stop string.
    Stop,
    /// `max_tokens` tokens were generated.
    Length,
}

impl FinishReason {
    /// `"stop"` or `"length"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What matched when a sequence finished with [`FinishReason::Stop`] (vLLM's `stop_reason`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// One of the model's EOS tokens.
    Eos(u32),
    /// One of the request's `stop_token_ids`.
    StopToken(u32),
    /// One of the request's `stop` strings.
    StopString(String),
}

/// The outcome of feeding one token to a [`StopChecker`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StopStep {
    /// Text that may be shown now (possibly empty while text is held back).
    pub text: String,
    /// Set once the sequence is finished; then `text` is the last of it.
    pub finish: Option<FinishReason>,
    /// What stopped it, for [`FinishReason::Stop`].
    pub stop_reason: Option<StopReason>,
}

/// Tracks one sequence against its stop conditions: EOS and stop token ids, stop strings and
/// `max_tokens`. Stop strings are matched across token boundaries; text that could be the start
/// of a stop string is held back until it is known not to be, so a streamed response never
/// shows part of a stop string. Stop tokens and stop strings are not part of the output.
#[derive(Debug, Clone)]
pub struct StopChecker {
    stop_strings: Vec<String>,
    stop_token_ids: Vec<u32>,
    eos_token_ids: Vec<u32>,
    max_tokens: u32,
    generated: u32,
    /// Text received but not yet released (a possible stop-string prefix).
    held: String,
    finish: Option<FinishReason>,
}

impl StopChecker {
    /// A checker for `params`; `eos_token_ids` (the tokenizer's) stop the sequence unless
    /// `params.ignore_eos`.
    pub fn new(params: &SamplingParams, eos_token_ids: &[u32]) -> Self {
        Self {
            stop_strings: params
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .cloned()
                .collect(),
            stop_token_ids: params.stop_token_ids.clone(),
            eos_token_ids: if params.ignore_eos {
                Vec::new()
            } else {
                eos_token_ids.to_vec()
            },
            max_tokens: params.max_tokens,
            generated: 0,
            held: String::new(),
            finish: None,
        }
    }

    /// Tokens fed so far (stop tokens included, as usage counts them).
    pub fn generated(&self) -> u32 {
        self.generated
    }

    /// The finish reason, once finished.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// Feeds the next generated token and the text it added (empty while the detokenizer
    /// waits for the rest of a character). After a finish, returns empty steps.
    pub fn push(&mut self, token_id: u32, text_delta: &str) -> StopStep {
        if let Some(finish) = self.finish {
            return StopStep {
                finish: Some(finish),
                ..StopStep::default()
            };
        }
        self.generated = self.generated.saturating_add(1);

        let token_reason = if self.eos_token_ids.contains(&token_id) {
            Some(StopReason::Eos(token_id))
        } else if self.stop_token_ids.contains(&token_id) {
            Some(StopReason::StopToken(token_id))
        } else {
            None
        };
        if let Some(reason) = token_reason {
            return self.finish_with(FinishReason::Stop, Some(reason), None);
        }

        self.held.push_str(text_delta);
        if let Some((at, stop)) = self.find_stop_string() {
            let reason = Some(StopReason::StopString(stop));
            return self.finish_with(FinishReason::Stop, reason, Some(at));
        }
        if self.generated >= self.max_tokens {
            return self.finish_with(FinishReason::Length, None, None);
        }
        let keep_from = self.held_back_start();
        let rest = self.held.split_off(keep_from);
        StopStep {
            text: std::mem::replace(&mut self.held, rest),
            ..StopStep::default()
        }
    }

    /// Releases held-back text when the sequence ends for a reason the checker does not see
    /// (the client went away, the detokenizer flushed a final partial character).
    pub fn take_held(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Marks the sequence finished and releases the held text, cut at `cut_at` if given.
    fn finish_with(
        &mut self,
        finish: FinishReason,
        stop_reason: Option<StopReason>,
        cut_at: Option<usize>,
    ) -> StopStep {
        self.finish = Some(finish);
        let mut text = std::mem::take(&mut self.held);
        if let Some(at) = cut_at {
            text.truncate(at);
        }
        StopStep {
            text,
            finish: Some(finish),
            stop_reason,
        }
    }

    /// The earliest stop string in the held text: (byte offset, the string). Held text holds
    /// no complete stop string from earlier steps, so only it needs searching.
    fn find_stop_string(&self) -> Option<(usize, String)> {
        self.stop_strings
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, _)| at)
            .map(|(at, s)| (at, s.clone()))
    }

    /// Byte offset of the longest suffix of the held text that begins some stop string.
    fn held_back_start(&self) -> usize {
        let longest = self.stop_strings.iter().map(String::len).max().unwrap_or(0);
        let earliest = self.held.len().saturating_sub(longest.saturating_sub(1));
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .filter(|&i| i >= earliest)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stop_strings.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checker(stop: &[&str], max_tokens: u32) -> StopChecker {
        let params = SamplingParams {
            stop: stop.iter().map(|s| s.to_string()).collect(),
            stop_token_ids: vec![7],
            max_tokens,
            ..SamplingParams::default()
        };
        StopChecker::new(&params, &[2])
    }

    /// Feeds (id, text) pairs, returning the concatenated released text and the last step.
    fn feed(c: &mut StopChecker, steps: &[(u32, &str)]) -> (String, StopStep) {
        let mut out = String::new();
        let mut last = StopStep::default();
        for &(id, text) in steps {
            last = c.push(id, text);
            out.push_str(&last.text);
        }
        (out, last)
    }

    #[test]
    fn stop_string_across_tokens_is_trimmed_and_never_shown() {
        let mut c = checker(&["\n\nUser:"], 100);
        let mut shown = Vec::new();
        for (id, t) in [(10, "Hi"), (11, " there\n"), (12, "\nUs"), (13, "er: more")] {
            let step = c.push(id, t);
            shown.push(step.text.clone());
            if step.finish.is_some() {
                assert_eq!(step.finish, Some(FinishReason::Stop));
                assert_eq!(
                    step.stop_reason,
                    Some(StopReason::StopString("\n\nUser:".into()))
                );
            }
        }
        assert_eq!(shown, ["Hi", " there", "", ""]);
        assert_eq!(shown.concat(), "Hi there");
        assert_eq!(c.finish_reason(), Some(FinishReason::Stop));
        assert_eq!(
            c.push(14, "x"),
            StopStep {
                finish: Some(FinishReason::Stop),
                ..Default::default()
            }
        );
    }

    #[test]
    fn held_text_is_released_when_it_stops_matching() {
        let mut c = checker(&["STOP"], 100);
        assert_eq!(c.push(1, "ab ST").text, "ab ");
        assert_eq!(c.push(1, "O").text, "");
        assert_eq!(c.push(1, "P?").finish, Some(FinishReason::Stop));
        let mut c = checker(&["STOP"], 100);
        let (out, last) = feed(&mut c, &[(1, "ST"), (1, "OR"), (1, "Y")]);
        assert_eq!((out.as_str(), last.finish), ("STORY", None));
    }

    #[test]
    fn earliest_stop_string_wins_and_multibyte_text_is_safe() {
        let mut c = checker(&["世界", "é!"], 100);
        let (out, last) = feed(&mut c, &[(1, "héé"), (1, "!世界")]);
        assert_eq!(out, "hé");
        assert_eq!(last.stop_reason, Some(StopReason::StopString("é!".into())));
        let mut c = checker(&["世界"], 100);
        assert_eq!(c.push(1, "a世").text, "a");
        assert_eq!(c.push(1, "b").text, "世b");
    }

    #[test]
    fn eos_and_stop_token_ids_finish_and_release_held_text() {
        let mut c = checker(&["STOP"], 100);
        let (out, last) = feed(&mut c, &[(1, "x S"), (2, "<eos>")]);
        assert_eq!(out, "x S");
        assert_eq!(last.stop_reason, Some(StopReason::Eos(2)));
        let mut c = checker(&[], 100);
        let (out, last) = feed(&mut c, &[(1, "x"), (7, "<stop>")]);
        assert_eq!(
            (out.as_str(), last.stop_reason),
            ("x", Some(StopReason::StopToken(7)))
        );
        assert_eq!(c.generated(), 2);
    }

    #[test]
    fn ignore_eos_and_length() {
        let params = SamplingParams {
            ignore_eos: true,
            max_tokens: 3,
            stop: vec!["zz".into()],
            ..SamplingParams::default()
        };
        let mut c = StopChecker::new(&params, &[2]);
        let (out, last) = feed(&mut c, &[(2, "a"), (2, "b"), (2, "cz")]);
        assert_eq!(out, "abcz", "held text is released at the length limit");
        assert_eq!(last.finish, Some(FinishReason::Length));
        assert_eq!(last.finish.map(FinishReason::as_str), Some("length"));
        // A stop on the last allowed token is a stop, not a length finish.
        let mut c = checker(&["c"], 2);
        let (_, last) = feed(&mut c, &[(1, "a"), (1, "bc")]);
        assert_eq!(last.finish, Some(FinishReason::Stop));
    }

    #[test]
    fn take_held_releases_pending_text() {
        let mut c = checker(&["STOP"], 100);
        assert_eq!(c.push(1, "aST").text, "a");
        assert_eq!(c.take_held(), "ST");
    }
}
