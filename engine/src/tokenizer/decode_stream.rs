//! Incremental detokenization for streaming responses.
//!
//! Byte-level BPE can split one character across tokens, and SentencePiece decoders treat the
//! first token of a sequence specially, so decoding each token alone is wrong. Like TGI and
//! vLLM, [`DecodeStream`] decodes a short window twice — up to the last emitted token and up to
//! the newest one — and emits the difference once it no longer ends in an incomplete character.

use super::{TextTokenizer, TokenizerError};

/// Turns a stream of token ids into text deltas whose concatenation equals
/// [`TextTokenizer::decode`] of all ids (once [`DecodeStream::flush`] has been called).
#[derive(Debug)]
pub struct DecodeStream {
    tokenizer: TextTokenizer,
    skip_special_tokens: bool,
    /// Ids from the start of the decode window on; ids before it are dropped.
    ids: Vec<u32>,
    /// `ids[..prefix_len]` is the context already emitted that the window is decoded with.
    prefix_len: usize,
    /// `ids[..read_len]` has been emitted as text.
    read_len: usize,
}

/// Replacement character the decoders produce for bytes that are not (yet) valid UTF-8.
const REPLACEMENT: char = '\u{FFFD}';

impl DecodeStream {
    pub(super) fn new(tokenizer: TextTokenizer, skip_special_tokens: bool) -> Self {
        Self {
            tokenizer,
            skip_special_tokens,
            ids: Vec::new(),
            prefix_len: 0,
            read_len: 0,
        }
    }

    /// Adds one generated id; returns the new text it completes, or `None` while the pending
    /// tokens end inside a multi-byte character (or produce no text).
    pub fn push(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        self.ids.push(id);
        let delta = self.delta()?;
        match delta {
            Some(text) if !text.ends_with(REPLACEMENT) => {
                self.advance();
                Ok(Some(text))
            }
            _ => Ok(None),
        }
    }

    /// Pushes several ids; returns the text they complete (possibly empty).
    pub fn push_all(&mut self, ids: &[u32]) -> Result<String, TokenizerError> {
        let mut out = String::new();
        for &id in ids {
            if let Some(text) = self.push(id)? {
                out.push_str(&text);
            }
        }
        Ok(out)
    }

    /// Text still held back when generation ends (an incomplete character becomes U+FFFD, as
    /// in a full decode). Call once, after the last [`push`](Self::push).
    pub fn flush(&mut self) -> Result<Option<String>, TokenizerError> {
        let delta = self.delta()?;
        if delta.is_some() {
            self.advance();
        }
        Ok(delta)
    }

    /// New text of `ids[prefix_len..]` beyond that of `ids[prefix_len..read_len]`, if any.
    fn delta(&self) -> Result<Option<String>, TokenizerError> {
        if self.read_len == self.ids.len() {
            return Ok(None);
        }
        let window = &self.ids[self.prefix_len..];
        let prefix_text = self.tokenizer.decode(
            &window[..self.read_len - self.prefix_len],
            self.skip_special_tokens,
        )?;
        let full_text = self.tokenizer.decode(window, self.skip_special_tokens)?;
        if full_text.len() <= prefix_text.len() {
            return Ok(None);
        }
        // Decoding more tokens only appends text for the tokenizers we serve; if a decoder ever
        // rewrote the prefix, holding back is safer than emitting a slice inside a character.
        Ok(full_text
            .get(prefix_text.len()..)
            .filter(|_| full_text.starts_with(&prefix_text))
            .map(str::to_owned))
    }

    /// Marks everything pushed as emitted and slides the window.
    fn advance(&mut self) {
        self.ids.drain(..self.prefix_len);
        self.read_len -= self.prefix_len;
        self.prefix_len = self.read_len;
        self.read_len = self.ids.len();
    }
}
