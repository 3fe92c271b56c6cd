//! Deterministic synthetic byte-level BPE tokenizers of any vocabulary size.
//!
//! Tests, benchmarks and synthetic models need a real tokenizer whose vocabulary matches a
//! model's embedding size without downloading anything or training on data. The vocabulary is
//! the 256 GPT-2 byte tokens, then merges built from a fixed list of common English fragments
//! followed by systematically longer letter strings, then the special tokens
//! [`SPECIAL_TOKENS`]. Every merge joins two tokens that already exist, so the files load in
//! the `tokenizers` crate and in Python's `tokenizers` / transformers alike, and any UTF-8 text
//! round-trips through encode and decode.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value as Json};

/// Smallest vocabulary this generator makes (the 256 bytes, specials, and a few merges).
pub const MIN_SYNTH_VOCAB: usize = 300;
/// Largest vocabulary this generator makes.
pub const MAX_SYNTH_VOCAB: usize = 300_000;
/// Special tokens, occupying the last three ids in this order.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
/// `model_max_length` written to `tokenizer_config.json`.
pub const SYNTH_MODEL_MAX_LENGTH: usize = 32_768;

/// ChatML, as Qwen models render it (no default system prompt).
const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] \
+ '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt \
%}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Errors of generating or writing a synthetic tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum SynthTokenizerError {
    /// The requested vocabulary size is outside what the generator supports.
    #[error(
        "synthetic vocabulary size {requested} is outside {MIN_SYNTH_VOCAB}..={MAX_SYNTH_VOCAB}"
    )]
    VocabSize {
        /// The size asked for.
        requested: usize,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The JSON documents of a synthetic tokenizer, for writers that place them themselves (a
/// tile pack being assembled in a temporary directory).
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticTokenizerFiles {
    /// `tokenizer.json`.
    pub tokenizer: Json,
    /// `tokenizer_config.json`: eos `<|endoftext|>`, ChatML template, `model_max_length`.
    pub tokenizer_config: Json,
    /// `generation_config.json`: both `<|endoftext|>` and `<|im_end|>` end generation, so chat
    /// turns stop where ChatML closes them.
    pub generation_config: Json,
}

impl SyntheticTokenizerFiles {
    /// (file name, document) pairs in a stable order.
    pub fn files(&self) -> [(&'static str, &Json); 3] {
        [
            ("tokenizer.json", &self.tokenizer),
            ("tokenizer_config.json", &self.tokenizer_config),
            ("generation_config.json", &self.generation_config),
        ]
    }
}

/// GPT-2's `bytes_to_unicode`: byte value → the printable character standing for it, in the
/// order GPT-2 numbers them (printable bytes first).
fn byte_alphabet() -> Vec<(u8, char)> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut out: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    // The others map, in byte order, to U+0100 onwards.
    for (code, b) in (256u32..).zip((0..=255u8).filter(|&b| !printable(b))) {
        out.push((b, char::from_u32(code).unwrap_or('?')));
    }
    out
}

/// Common English words, most frequent first; each gets plain, `Ġ`-prefixed and capitalised
/// forms.
const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "had",
    "they",
    "you",
    "were",
    "their",
    "one",
    "all",
    "we",
    "can",
    "her",
    "has",
    "there",
    "been",
    "if",
    "more",
    "when",
    "will",
    "would",
    "who",
    "so",
    "no",
    "she",
    "other",
    "its",
    "may",
    "these",
    "what",
    "them",
    "than",
    "some",
    "him",
    "time",
    "into",
    "only",
    "do",
    "also",
    "about",
    "new",
    "could",
    "first",
    "then",
    "like",
    "two",
    "my",
    "over",
    "most",
    "me",
    "any",
    "after",
    "where",
    "your",
    "should",
    "how",
    "our",
    "made",
    "such",
    "work",
    "people",
    "model",
    "data",
    "token",
    "text",
    "question",
    "answer",
    "user",
    "assistant",
    "system",
    "function",
    "return",
    "value",
    "number",
    "string",
    "because",
    "between",
    "through",
    "world",
    "hello",
];
/// Frequent word pieces (suffixes, stems) that BPE vocabularies always learn.
const PIECES: &[&str] = &[
    "ing", "ion", "tion", "ation", "ed", "er", "es", "en", "ent", "ment", "ly", "al", "ic", "ity",
    "ive", "ous", "able", "ness", "est", "re", "con", "pro", "un", "de", "st", "th", "ch", "sh",
];
/// Punctuation, digit and whitespace runs that GPT-2's pre-tokenizer keeps together.
const SYMBOLS: &[&str] = &[
    "ĠĠ",
    "ĠĠĠ",
    "ĠĠĠĠ",
    "ĠĠĠĠĠĠĠ",
    "ĠĠĠĠĠĠĠĠ",
    "ĊĊ",
    "ĊĊĊ",
    "ĉĉ",
    "ĉĉĉ",
    ".Ċ",
    "..",
    "...",
    "Ġ(",
    "Ġ\"",
    "Ġ'",
    "Ġ-",
    "Ġ=",
    "Ġ==",
    "Ġ{",
    "Ġ}",
    "Ġ[",
    "Ġ+",
    "Ġ*",
    "Ġ/",
    "Ġ//",
    "Ġ<",
    "Ġ>",
    "Ġ->",
    "Ġ=>",
    "Ġ:",
    "Ġ&",
    "Ġ|",
    "Ġ#",
    "Ġ$",
    "Ġ%",
    "),",
    ");",
    "()",
    "():",
    "();",
    "->",
    "::",
    "//",
    "/*",
    "*/",
    "==",
    "!=",
    "<=",
    ">=",
    "**",
    "--",
    "\",",
    "\":",
    "'s",
    "'t",
    "'re",
    "'ve",
    "'m",
    "'ll",
    "'d",
];
/// Lowercase letters, most frequent in English first: the systematic phase enumerates strings
/// over this order so common combinations get low ranks.
const LETTERS: &str = "etaoinsrhldcumfpgwybvkxjqz";

/// Accumulates merges until the budget is spent.
struct MergeBuilder {
    vocab: HashMap<String, u32>,
    order: Vec<String>,
    merges: Vec<String>,
    budget: usize,
}

impl MergeBuilder {
    fn full(&self) -> bool {
        self.merges.len() >= self.budget
    }

    /// Adds `token` (in the byte alphabet) as the merge of its prefix and its last character,
    /// adding the prefix first if needed. Does nothing once the budget is spent.
    fn add(&mut self, token: &str) {
        if self.full() || self.vocab.contains_key(token) {
            return;
        }
        let Some((split, _)) = token.char_indices().next_back() else {
            return;
        };
        if split == 0 {
            return; // a single character that is not a byte token: not representable
        }
        let (head, tail) = token.split_at(split);
        if !self.vocab.contains_key(tail) {
            return;
        }
        self.add(head);
        if self.full() || !self.vocab.contains_key(head) {
            return;
        }
        let id = u32::try_from(self.order.len()).unwrap_or(u32::MAX);
        self.merges.push(format!("{head} {tail}"));
        self.vocab.insert(token.to_owned(), id);
        self.order.push(token.to_owned());
    }

    /// Adds `word` in its plain, `Ġ`-prefixed and capitalised forms.
    fn add_word_forms(&mut self, word: &str) {
        let mut cap = String::with_capacity(word.len());
        let mut chars = word.chars();
        if let Some(first) = chars.next() {
            cap.extend(first.to_uppercase());
            cap.push_str(chars.as_str());
        }
        for form in [format!("Ġ{word}"), word.to_owned(), format!("Ġ{cap}"), cap] {
            self.add(&form);
        }
    }
}

/// Builds the vocabulary (token strings in id order) and merges for `n_merges` merges.
fn build_vocab(n_merges: usize) -> (Vec<String>, Vec<String>) {
    let alphabet = byte_alphabet();
    let mut b = MergeBuilder {
        vocab: HashMap::with_capacity(alphabet.len() + n_merges),
        order: Vec::with_capacity(alphabet.len() + n_merges),
        merges: Vec::with_capacity(n_merges),
        budget: n_merges,
    };
    for (i, (_, c)) in alphabet.iter().enumerate() {
        b.vocab.insert(c.to_string(), u32::try_from(i).unwrap_or(0));
        b.order.push(c.to_string());
    }
    for word in WORDS.iter().chain(PIECES) {
        b.add_word_forms(word);
    }
    for sym in SYMBOLS {
        b.add(sym);
    }
    for n in 0..1000 {
        b.add(&n.to_string());
    }
    // Systematic phase: every letter string of length 2, 3, … in all four forms. Each level
    // only needs the previous one, so every merge's parts exist.
    let letters: Vec<char> = LETTERS.chars().collect();
    let mut level: Vec<String> = letters.iter().map(char::to_string).collect();
    while !b.full() {
        let mut next = Vec::with_capacity(level.len() * letters.len());
        for stem in &level {
            for &c in &letters {
                let word = format!("{stem}{c}");
                b.add_word_forms(&word);
                next.push(word);
                if b.full() {
                    break;
                }
            }
            if b.full() {
                break;
            }
        }
        level = next;
    }
    (b.order, b.merges)
}

/// The documents of a byte-level BPE tokenizer with exactly `vocab_size` tokens (specials
/// included), identical for equal sizes.
pub fn synthetic_tokenizer(
    vocab_size: usize,
) -> Result<SyntheticTokenizerFiles, SynthTokenizerError> {
    if !(MIN_SYNTH_VOCAB..=MAX_SYNTH_VOCAB).contains(&vocab_size) {
        return Err(SynthTokenizerError::VocabSize {
            requested: vocab_size,
        });
    }
    let n_merges = vocab_size - 256 - SPECIAL_TOKENS.len();
    let (order, merges) = build_vocab(n_merges);

    let first_special = order.len();
    let vocab: Map<String, Json> = order
        .into_iter()
        .enumerate()
        .map(|(id, token)| (token, Json::from(id)))
        .collect();
    let merges: Vec<Json> = merges.into_iter().map(Json::String).collect();
    let added_tokens: Vec<Json> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, content)| {
            json!({
                "id": first_special + i, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true,
            })
        })
        .collect();
    let added_tokens_decoder: Map<String, Json> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(i, content)| {
            let entry = json!({
                "content": content, "lstrip": false, "normalized": false, "rstrip": false,
                "single_word": false, "special": true,
            });
            ((first_special + i).to_string(), entry)
        })
        .collect();

    let byte_level = |add_prefix_space: bool, trim_offsets: bool, use_regex: bool| {
        json!({
            "type": "ByteLevel", "add_prefix_space": add_prefix_space,
            "trim_offsets": trim_offsets, "use_regex": use_regex,
        })
    };
    let mut model = json!({
        "type": "BPE", "dropout": null, "unk_token": null,
        "continuing_subword_prefix": null, "end_of_word_suffix": null,
        "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    });
    // Inserted as built values: `json!` would re-serialize these large collections.
    if let Some(m) = model.as_object_mut() {
        m.insert("vocab".to_owned(), Json::Object(vocab));
        m.insert("merges".to_owned(), Json::Array(merges));
    }
    let mut tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added_tokens,
        "normalizer": null,
        "pre_tokenizer": byte_level(false, true, true),
        "post_processor": byte_level(false, false, false),
        "decoder": byte_level(false, true, true),
    });
    if let Some(t) = tokenizer.as_object_mut() {
        t.insert("model".to_owned(), model);
    }
    let tokenizer_config = json!({
        "add_bos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": null,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": false,
        "eos_token": SPECIAL_TOKENS[0],
        "errors": "replace",
        "model_max_length": SYNTH_MODEL_MAX_LENGTH,
        "pad_token": SPECIAL_TOKENS[0],
        "split_special_tokens": false,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": null,
    });
    let generation_config = json!({
        "eos_token_id": [first_special, first_special + 2],
        "pad_token_id": first_special,
    });
    Ok(SyntheticTokenizerFiles {
        tokenizer,
        tokenizer_config,
        generation_config,
    })
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` of a
/// synthetic tokenizer with exactly `vocab_size` tokens into the existing directory `dir`.
pub fn write_synthetic_tokenizer(dir: &Path, vocab_size: usize) -> Result<(), SynthTokenizerError> {
    let files = synthetic_tokenizer(vocab_size)?;
    for (name, doc) in files.files() {
        let path = dir.join(name);
        // Serializing a `serde_json::Value` cannot fail.
        let bytes = serde_json::to_vec(doc).unwrap_or_default();
        std::fs::write(&path, bytes)
            .map_err(|source| SynthTokenizerError::Write { path, source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
