//! Tests of [`TextTokenizer`]. Expected ids and rendered prompts were produced by HF
//! transformers 5.23 / tokenizers 0.23 (`AutoTokenizer.from_pretrained(dir)(text)`,
//! `apply_chat_template(..., tokenize=False)`) on the same files.

use std::path::Path;

use serde_json::json;

use super::*;
use crate::synth_tokenizer::write_synthetic_tokenizer;

/// A model directory holding the 2000-token synthetic tokenizer; `config` replaces its
/// `tokenizer_config.json` when given.
fn model_dir(config: Option<Json>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_tokenizer(dir.path(), 2000).unwrap();
    if let Some(config) = config {
        write_json(dir.path(), "tokenizer_config.json", &config);
    }
    dir
}

fn write_json(dir: &Path, name: &str, value: &Json) {
    std::fs::write(dir.join(name), serde_json::to_vec(value).unwrap()).unwrap();
}

fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
    pairs.iter().map(|&(r, c)| ChatMessage::new(r, c)).collect()
}

/// Exercises Python-flavoured Jinja: a Qwen3 template plus `tojson`, string methods, `items()`
/// and an undefined `bos_token`.
const QWEN3_LIKE_TEMPLATE: &str = r##"{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
{{- '[' + (messages[0] | tojson) + '|' + (messages | length | string) + '|' + messages[-1].content.title() + '|' + (messages[0].content.replace('a', 'A') | upper) + ']' }}
{%- for k, v in messages[0].items() %}{{ k }}={{ v|trim }};{% endfor %}
{% if bos_token is defined %}bos={{ bos_token }}{% else %}no-bos{% endif %}
"##;

const MIXTRAL_TEMPLATE: &str =
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] \
== 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate \
user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' \
+ message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ \
message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles \
are supported!') }}{% endif %}{% endfor %}";

fn conversation() -> Vec<ChatMessage> {
    msgs(&[
        ("system", "You are a helpful assistant."),
        ("user", "What is 2+2?"),
        ("assistant", "<think>\nadd them\n</think>\n\nIt is 4."),
        ("user", "and  3+3 ?"),
    ])
}

#[test]
fn encode_matches_hf() {
    let dir = model_dir(None);
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let cases: [(&str, &[u32]); 6] = [
        ("Hello, world!", &[1279, 11, 322, 391, 75, 67, 0]),
        (
            "The people who made the model should return the answer.",
            &[265, 919, 588, 887, 258, 938, 857, 1125, 258, 1014, 476, 13],
        ),
        (
            "  leading spaces\n\n\ttabs and\r\nCRLF",
            &[
                220, 772, 68, 64, 67, 1281, 592, 79, 64, 66, 1323, 1417, 197, 83, 716, 82, 274,
                201, 198, 34, 49, 43, 37,
            ],
        ),
        (
            "café — naïve 日本語 😀👩‍👩‍👧",
            &[
                507, 69, 127, 102, 220, 158, 222, 242, 358, 64, 127, 107, 85, 68, 220, 162, 245,
                98, 162, 250, 105, 164, 103, 252, 220, 172, 253, 246, 222, 172, 253, 239, 102, 158,
                222, 235, 172, 253, 239, 102, 158, 222, 235, 172, 253, 239, 100,
            ],
        ),
        (
            "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
            &[1998, 1036, 198, 400, 1999, 198, 1997],
        ),
        (
            "don't you're I'll we've 12345 3.14159 x=y+1; if (a == b) { return c->d; }",
            &[
                67, 355, 1466, 464, 6, 1126, 289, 1473, 472, 1470, 220, 1477, 1810, 220, 18, 13,
                1479, 1624, 220, 87, 28, 88, 10, 16, 26, 538, 1424, 64, 1429, 344, 8, 1430, 1125,
                504, 1452, 67, 26, 1431,
            ],
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(tok.encode(text, true).unwrap(), expected, "{text:?}");
        assert_eq!(tok.decode(expected, false).unwrap(), text);
    }
    assert_eq!(tok.decode(&[1998, 1036, 1999], true).unwrap(), "user");
}

#[test]
fn vocabulary_lookups() {
    let dir = model_dir(None);
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.vocab_size(), 2000);
    assert_eq!(tok.token_to_id("Ġthe"), Some(258));
    assert_eq!(tok.id_to_token(258).as_deref(), Some("Ġthe"));
    assert_eq!(tok.id_to_token(2000), None);
    assert_eq!(tok.token_to_id("not a token"), None);
    assert_eq!(tok.model_max_length(), Some(32_768));
    assert_eq!(tok.eos_token(), Some("<|endoftext|>"));
    assert_eq!(tok.bos_token(), None);
    assert!(
        tok.decode(&[5, 99_999], false).is_ok(),
        "unknown ids are skipped, not a panic"
    );
    assert!(format!("{tok:?}").contains("vocab_size: 2000"));
}

#[test]
fn eos_ids_are_the_union_of_all_configs() {
    let dir = model_dir(Some(json!({
        "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "special": true},
        "bos_token": "<|im_start|>",
    })));
    write_json(
        dir.path(),
        "generation_config.json",
        &json!({"eos_token_id": [1997, 5]}),
    );
    write_json(
        dir.path(),
        "config.json",
        &json!({"eos_token_id": 7, "vocab_size": 2048}),
    );
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_ids(), [5, 7, 1997, 1999]);
    assert_eq!(tok.eos_token(), Some("<|im_end|>"));
    assert_eq!(tok.bos_token(), Some("<|im_start|>"));

    write_json(dir.path(), "config.json", &json!({"eos_token_id": null}));
    write_json(dir.path(), "generation_config.json", &json!({}));
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tok.eos_token_ids(), [1999]);
}

#[test]
fn bad_files_are_errors_naming_the_file() {
    let dir = model_dir(None);
    let err_of = |dir: &Path| TextTokenizer::from_dir(dir).unwrap_err();

    write_json(dir.path(), "config.json", &json!({"eos_token_id": "two"}));
    let err = err_of(dir.path());
    assert!(
        matches!(
            err,
            TokenizerError::Field {
                field: "eos_token_id",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("config.json"), "{err}");
    std::fs::remove_file(dir.path().join("config.json")).unwrap();

    std::fs::write(dir.path().join("generation_config.json"), "{not json").unwrap();
    let err = err_of(dir.path());
    assert!(matches!(err, TokenizerError::Json { .. }), "{err:?}");
    assert!(err.to_string().contains("generation_config.json"), "{err}");
    std::fs::remove_file(dir.path().join("generation_config.json")).unwrap();

    write_json(
        dir.path(),
        "tokenizer_config.json",
        &json!({"eos_token": 3}),
    );
    let err = err_of(dir.path());
    assert!(
        matches!(
            err,
            TokenizerError::Field {
                field: "eos_token",
                ..
            }
        ),
        "{err:?}"
    );

    std::fs::write(dir.path().join("tokenizer.json"), r#"{"model": {}}"#).unwrap();
    let err = err_of(dir.path());
    assert!(matches!(err, TokenizerError::Load { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    let empty = tempfile::tempdir().unwrap();
    let err = err_of(empty.path());
    assert!(matches!(err, TokenizerError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn tokenizer_config_is_optional() {
    let dir = model_dir(None);
    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert!(!tok.has_chat_template());
    // generation_config.json still names the eos ids.
    assert_eq!(tok.eos_token_ids(), [1997, 1999]);
    let err = tok.apply_chat_template(&conversation(), true).unwrap_err();
    assert!(matches!(err, TokenizerError::NoChatTemplate { .. }));
    assert_eq!(
        err.to_string(),
        format!("model has no chat template in {}", dir.path().display())
    );
}

#[test]
fn qwen3_like_template_renders_like_hf() {
    let dir = model_dir(Some(json!({
        "chat_template": QWEN3_LIKE_TEMPLATE, "eos_token": "<|im_end|>",
    })));
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let all = conversation();
    assert_eq!(tok.apply_chat_template(&all, true).unwrap(), "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n<|im_start|>user\nand  3+3 ?<|im_end|>\n<|im_start|>assistant\n[{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}|4|And  3+3 ?|YOU ARE A HELPFUL ASSISTANT.]role=system;content=You are a helpful assistant.;no-bos");
    assert_eq!(tok.apply_chat_template(&all[..3], false).unwrap(), "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\nadd them\n</think>\n\nIt is 4.<|im_end|>\n[{\"role\": \"system\", \"content\": \"You are a helpful assistant.\"}|3|<Think>\nAdd Them\n</Think>\n\nIt Is 4.|YOU ARE A HELPFUL ASSISTANT.]role=system;content=You are a helpful assistant.;no-bos");

    write_json(
        dir.path(),
        "tokenizer_config.json",
        &json!({
            "chat_template": QWEN3_LIKE_TEMPLATE, "bos_token": {"content": "<|im_start|>"},
        }),
    );
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let prompt = tok.apply_chat_template(&all[..3], false).unwrap();
    assert!(
        prompt.ends_with("re a helpful assistant.;bos=<|im_start|>"),
        "{prompt}"
    );
}

#[test]
fn mixtral_template_uses_special_tokens_and_can_reject() {
    let dir = model_dir(Some(json!({
        "chat_template": MIXTRAL_TEMPLATE,
        "bos_token": "<|im_start|>",
        "eos_token": "<|endoftext|>",
    })));
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let all = conversation();
    assert_eq!(
        tok.apply_chat_template(&all[1..4], false).unwrap(),
        "<|im_start|>[INST] What is 2+2? [/INST]<think>\nadd them\n</think>\n\nIt is 4.\
         <|endoftext|>[INST] and  3+3 ? [/INST]"
    );
    match tok.apply_chat_template(&all, false).unwrap_err() {
        TokenizerError::ChatRejected { message, .. } => assert_eq!(
            message,
            "Conversation roles must alternate user/assistant/user/assistant/..."
        ),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn template_sources_and_their_errors() {
    // A list of named templates: "default" is used.
    let dir = model_dir(Some(json!({"chat_template": [
        {"name": "tool_use", "template": "tools"},
        {"name": "default", "template": "{{ messages[0].content }}"},
    ]})));
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&msgs(&[("user", "x")]), true)
            .unwrap(),
        "x"
    );

    // chat_template.jinja takes precedence over the config field.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "J{{ messages | length }}\n",
    )
    .unwrap();
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&msgs(&[("user", "x")]), true)
            .unwrap(),
        "J1"
    );
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();

    let dir = model_dir(Some(
        json!({"chat_template": [{"name": "rag", "template": "r"}]}),
    ));
    let err = TextTokenizer::from_dir(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            TokenizerError::Field {
                field: "chat_template",
                ..
            }
        ),
        "{err:?}"
    );

    // A template that does not compile still lets the model load for plain completions.
    let dir = model_dir(Some(json!({"chat_template": "{% for %}"})));
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    assert!(tok.has_chat_template());
    assert_eq!(tok.encode("hi", true).unwrap().len(), 1);
    let err = tok
        .apply_chat_template(&msgs(&[("user", "x")]), true)
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::ChatTemplate { .. }),
        "{err:?}"
    );

    let dir = model_dir(Some(
        json!({"chat_template": "{{ messages[0].content.nosuchmethod() }}"}),
    ));
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let err = tok
        .apply_chat_template(&msgs(&[("user", "x")]), true)
        .unwrap_err();
    assert!(
        matches!(err, TokenizerError::ChatTemplate { .. }),
        "{err:?}"
    );
}

#[test]
fn decode_stream_emits_only_whole_characters() {
    let dir = model_dir(None);
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let text = "Hi 😀👩‍👩‍👧 日本語 café<|im_end|> done\n";
    let ids = tok.encode(text, false).unwrap();
    for skip in [false, true] {
        let mut stream = tok.decode_stream(skip);
        let mut deltas = Vec::new();
        let mut waited = 0;
        for &id in &ids {
            match stream.push(id).unwrap() {
                Some(delta) => deltas.push(delta),
                None => waited += 1,
            }
        }
        assert_eq!(stream.flush().unwrap(), None);
        assert!(waited > 5, "multi-byte characters span several byte tokens");
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
        assert_eq!(deltas.concat(), tok.decode(&ids, skip).unwrap());
    }
    // A generation cut inside a character flushes what a full decode shows.
    let emoji = tok.encode("😀", false).unwrap();
    let mut stream = tok.decode_stream(false);
    assert_eq!(stream.push_all(&emoji[..emoji.len() - 1]).unwrap(), "");
    assert_eq!(stream.flush().unwrap().as_deref(), Some("\u{FFFD}"));
}

/// A Llama/Mixtral-style tokenizer: SentencePiece-like normalizer (`▁` for spaces, prepended),
/// byte-fallback BPE and the decoder chain that strips the first leading space.
fn llama_style_dir() -> tempfile::TempDir {
    let mut vocab = serde_json::Map::new();
    for (id, t) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        vocab.insert((*t).to_owned(), json!(id));
    }
    for b in 0..=255u32 {
        vocab.insert(format!("<0x{b:02X}>"), json!(3 + b));
    }
    let pieces = [
        "▁", "H", "e", "l", "o", "w", "r", "d", "▁H", "▁He", "ll", "▁Hell", "▁Hello",
    ];
    for (i, t) in pieces.iter().enumerate() {
        vocab.insert((*t).to_owned(), json!(259 + i));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"},
            {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
        "pre_tokenizer": null,
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
            "byte_fallback": true, "vocab": vocab,
            "merges": ["▁ H", "▁H e", "l l", "▁He ll", "▁Hell o"]},
    });
    let dir = tempfile::tempdir().unwrap();
    write_json(dir.path(), "tokenizer.json", &tokenizer);
    write_json(
        dir.path(),
        "tokenizer_config.json",
        &json!({
            "bos_token": "<s>", "eos_token": "</s>", "chat_template": MIXTRAL_TEMPLATE,
        }),
    );
    dir
}

#[test]
fn sentencepiece_style_tokenizers_add_bos_and_stream() {
    let dir = llama_style_dir();
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let text = "Hello  world 😀 日本\nHello";
    let ids = tok.encode(text, true).unwrap();
    assert_eq!(&ids[..2], [1, 271], "<s> then ▁Hello");
    assert_eq!(tok.encode(text, false).unwrap(), ids[1..]);
    assert_eq!(tok.decode(&ids, true).unwrap(), text);
    assert_eq!(tok.eos_token_ids(), [2]);
    let mut stream = tok.decode_stream(true);
    let deltas: Vec<String> = ids
        .iter()
        .filter_map(|&id| stream.push(id).unwrap())
        .collect();
    assert_eq!(
        deltas[0], "Hello",
        "the first token's leading space is stripped once"
    );
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')), "{deltas:?}");
    assert_eq!(deltas.concat(), text);
    let prompt = tok
        .apply_chat_template(&msgs(&[("user", "hi")]), true)
        .unwrap();
    assert_eq!(prompt, "<s>[INST] hi [/INST]");
}
