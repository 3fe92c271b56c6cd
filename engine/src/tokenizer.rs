//! Text ↔ token ids for a model directory laid out like a HF checkpoint or a tile pack.
//!
//! [`TextTokenizer`] wraps the `tokenizers` crate (`tokenizer.json`) and the pieces of HF
//! transformers' tokenizer that live in `tokenizer_config.json`: special-token strings, the chat
//! template and the end-of-sequence ids (also read from `generation_config.json` and
//! `config.json`). Encoding matches HF `tokenizer(text)`; decoding matches HF
//! `tokenizer.decode(ids, clean_up_tokenization_spaces=False)`, which is also what the
//! streaming [`DecodeStream`] concatenates to.

mod chat_template;
mod decode_stream;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value as Json;

pub use chat_template::ChatMessage;
use chat_template::{ChatTemplate, TemplateTokens};
pub use decode_stream::DecodeStream;

/// Errors of loading a tokenizer, encoding, decoding or rendering a chat template.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A file of the model directory could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the model directory is malformed.
    #[error("cannot parse {path} as JSON")]
    Json {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// `tokenizer.json` is not a tokenizer the `tokenizers` crate understands.
    #[error("cannot load tokenizer from {path}")]
    Load {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: tokenizers::Error,
    },
    /// A field of a config file has a shape that is not understood.
    #[error("field `{field}` of {path} is invalid: {reason}")]
    Field {
        /// The file.
        path: PathBuf,
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Encoding text failed.
    #[error("cannot encode text with the tokenizer of {dir}")]
    Encode {
        /// The model directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: tokenizers::Error,
    },
    /// Decoding ids failed (typically an id outside the vocabulary).
    #[error("cannot decode token ids with the tokenizer of {dir}")]
    Decode {
        /// The model directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: tokenizers::Error,
    },
    /// The model ships no chat template, so chat requests cannot be served.
    #[error("model has no chat template in {dir}")]
    NoChatTemplate {
        /// The model directory.
        dir: PathBuf,
    },
    /// The chat template does not compile or failed while rendering.
    #[error("chat template of {dir} failed")]
    ChatTemplate {
        /// The model directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: minijinja::Error,
    },
    /// The chat template rejected the conversation through `raise_exception(message)`.
    #[error("chat template of {dir} rejected the conversation: {message}")]
    ChatRejected {
        /// The model directory.
        dir: PathBuf,
        /// The template's message (e.g. "Conversation roles must alternate …").
        message: String,
    },
}

/// A model's tokenizer, special tokens and chat template. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    tokenizer: tokenizers::Tokenizer,
    vocab_size: usize,
    eos_token_ids: Vec<u32>,
    tokens: TemplateTokens,
    model_max_length: Option<usize>,
    /// `None`: the model has no template; `Some(Err)`: it has one that does not compile.
    chat_template: Option<Result<ChatTemplate, Arc<minijinja::Error>>>,
}

impl fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("dir", &self.inner.dir)
            .field("vocab_size", &self.inner.vocab_size)
            .field("eos_token_ids", &self.inner.eos_token_ids)
            .field("tokens", &self.inner.tokens)
            .field("has_chat_template", &self.inner.chat_template.is_some())
            .finish_non_exhaustive()
    }
}

/// Reads and parses an optional JSON file: `Ok(None)` when it does not exist.
fn read_json_opt(path: &Path) -> Result<Option<Json>, TokenizerError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| TokenizerError::Json {
                    path: path.to_owned(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// A special-token field of `tokenizer_config.json`: a string, or an AddedToken object
/// `{"content": …}`; `null` or absent is `None`.
fn special_token(
    config: &Json,
    field: &'static str,
    path: &Path,
) -> Result<Option<String>, TokenizerError> {
    match config.get(field) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(obj)) => match obj.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::Field {
                path: path.to_owned(),
                field,
                reason: "object without a string `content`".to_owned(),
            }),
        },
        Some(other) => Err(TokenizerError::Field {
            path: path.to_owned(),
            field,
            reason: format!("expected a string or an object, found {other}"),
        }),
    }
}

/// Adds the ids of an `eos_token_id` field (an integer, a list of integers, or null) to `ids`.
fn collect_eos_ids(
    value: Option<&Json>,
    path: &Path,
    ids: &mut BTreeSet<u32>,
) -> Result<(), TokenizerError> {
    let bad = |v: &Json| TokenizerError::Field {
        path: path.to_owned(),
        field: "eos_token_id",
        reason: format!("expected a token id or a list of them, found {v}"),
    };
    let one = |v: &Json| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(v))
    };
    match value {
        None | Some(Json::Null) => {}
        Some(Json::Array(items)) => {
            for item in items {
                ids.insert(one(item)?);
            }
        }
        Some(v) => {
            ids.insert(one(v)?);
        }
    }
    Ok(())
}

/// Finds the template source: `chat_template.jinja` (newer HF exports) wins over the
/// `chat_template` field of `tokenizer_config.json` (a string, or a list of `{name, template}`
/// of which "default" is used), then `chat_template.json`.
fn chat_template_source(
    dir: &Path,
    config: &Json,
    config_path: &Path,
) -> Result<Option<String>, TokenizerError> {
    let jinja_path = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja_path) {
        Ok(s) => return Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(TokenizerError::Read {
                path: jinja_path,
                source,
            })
        }
    }
    let from_field =
        |value: Option<&Json>, path: &Path| -> Result<Option<String>, TokenizerError> {
            let bad = |reason: &str| TokenizerError::Field {
                path: path.to_owned(),
                field: "chat_template",
                reason: reason.to_owned(),
            };
            match value {
                None | Some(Json::Null) => Ok(None),
                Some(Json::String(s)) => Ok(Some(s.clone())),
                Some(Json::Array(list)) => {
                    let default = list
                        .iter()
                        .find(|t| t.get("name").and_then(Json::as_str) == Some("default"))
                        .ok_or_else(|| bad("list of templates has none named \"default\""))?;
                    match default.get("template") {
                        Some(Json::String(s)) => Ok(Some(s.clone())),
                        _ => Err(bad("template \"default\" has no string `template`")),
                    }
                }
                Some(_) => Err(bad("expected a string or a list of {name, template}")),
            }
        };
    if let Some(s) = from_field(config.get("chat_template"), config_path)? {
        return Ok(Some(s));
    }
    let json_path = dir.join("chat_template.json");
    match read_json_opt(&json_path)? {
        Some(v) => from_field(v.get("chat_template"), &json_path),
        None => Ok(None),
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` and, where present, `tokenizer_config.json`,
    /// `generation_config.json` and `config.json`.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref().to_owned();
        let tok_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tok_path).map_err(|source| TokenizerError::Read {
            path: tok_path.clone(),
            source,
        })?;
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|source| TokenizerError::Load {
                path: tok_path.clone(),
                source,
            })?;
        let vocab_size = tokenizer.get_vocab_size(true);

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_opt(&config_path)?.unwrap_or(Json::Null);
        let tokens = TemplateTokens {
            bos_token: special_token(&config, "bos_token", &config_path)?,
            eos_token: special_token(&config, "eos_token", &config_path)?,
            unk_token: special_token(&config, "unk_token", &config_path)?,
            pad_token: special_token(&config, "pad_token", &config_path)?,
        };
        let model_max_length = config
            .get("model_max_length")
            .and_then(Json::as_u64)
            .and_then(|n| usize::try_from(n).ok());

        let mut eos = BTreeSet::new();
        if let Some(token) = &tokens.eos_token {
            match tokenizer.token_to_id(token) {
                Some(id) => {
                    eos.insert(id);
                }
                None => tracing::warn!(
                    path = %config_path.display(),
                    token = %token,
                    "eos_token is not in the vocabulary"
                ),
            }
        }
        for name in ["generation_config.json", "config.json"] {
            let path = dir.join(name);
            if let Some(v) = read_json_opt(&path)? {
                collect_eos_ids(v.get("eos_token_id"), &path, &mut eos)?;
            }
        }

        let chat_template = chat_template_source(&dir, &config, &config_path)?
            .map(|src| ChatTemplate::compile(src).map_err(Arc::new));
        Ok(Self {
            inner: Arc::new(Inner {
                dir,
                tokenizer,
                vocab_size,
                eos_token_ids: eos.into_iter().collect(),
                tokens,
                model_max_length,
                chat_template,
            }),
        })
    }

    /// The model directory this tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Token ids of `text`, as HF `tokenizer(text, add_special_tokens=…)["input_ids"]`:
    /// with `add_special_tokens` the post-processor adds BOS/EOS where the model wants them.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        self.inner
            .tokenizer
            .encode(text, add_special_tokens)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|source| TokenizerError::Encode {
                dir: self.inner.dir.clone(),
                source,
            })
    }

    /// Text of `ids`, as HF `tokenizer.decode(ids, skip_special_tokens=…,
    /// clean_up_tokenization_spaces=False)`. Bytes that do not form UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|source| TokenizerError::Decode {
                dir: self.inner.dir.clone(),
                source,
            })
    }

    /// Number of tokens including added/special tokens (HF `len(tokenizer)`). The model's
    /// embedding may have more rows (padding); ids beyond this decode to nothing.
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    /// The id of a token string (in the tokenizer's own alphabet, e.g. `Ġthe`), if any.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    /// The token string of an id, if the id is in the vocabulary.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tokenizer.id_to_token(id)
    }

    /// Ids that end generation: the union of `tokenizer_config.json` `eos_token`,
    /// `generation_config.json` and `config.json` `eos_token_id`; sorted, no duplicates.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.inner.eos_token_ids
    }

    /// The BOS token string of `tokenizer_config.json`, if any.
    pub fn bos_token(&self) -> Option<&str> {
        self.inner.tokens.bos_token.as_deref()
    }

    /// The EOS token string of `tokenizer_config.json`, if any.
    pub fn eos_token(&self) -> Option<&str> {
        self.inner.tokens.eos_token.as_deref()
    }

    /// `model_max_length` of `tokenizer_config.json`, if given.
    pub fn model_max_length(&self) -> Option<usize> {
        self.inner.model_max_length
    }

    /// Whether the model ships a chat template (it may still fail to compile).
    pub fn has_chat_template(&self) -> bool {
        self.inner.chat_template.is_some()
    }

    /// The prompt text for a conversation, rendered by the model's chat template like HF
    /// `tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=…)`.
    /// Encode the result with `add_special_tokens = false`: templates write BOS themselves.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let dir = || self.inner.dir.clone();
        let template = match &self.inner.chat_template {
            None => return Err(TokenizerError::NoChatTemplate { dir: dir() }),
            Some(Err(e)) => {
                return Err(TokenizerError::ChatTemplate {
                    dir: dir(),
                    source: minijinja::Error::new(
                        minijinja::ErrorKind::InvalidOperation,
                        "template does not compile",
                    )
                    .with_source(Arc::clone(e)),
                })
            }
            Some(Ok(t)) => t,
        };
        template
            .render(messages, add_generation_prompt, &self.inner.tokens)
            .map_err(|source| match chat_template::raised_message(&source) {
                Some(message) => TokenizerError::ChatRejected {
                    dir: dir(),
                    message,
                },
                None => TokenizerError::ChatTemplate { dir: dir(), source },
            })
    }

    /// An incremental detokenizer for streaming this tokenizer's output.
    pub fn decode_stream(&self, skip_special_tokens: bool) -> DecodeStream {
        DecodeStream::new(self.clone(), skip_special_tokens)
    }
}

#[cfg(test)]
mod tests;
