use std::collections::HashSet;

use super::*;
use crate::tokenizer::{ChatMessage, TextTokenizer};

fn merges_of(files: &SyntheticTokenizerFiles) -> Vec<&str> {
    files.tokenizer["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect()
}

#[test]
fn sizes_outside_the_range_are_refused() {
    for bad in [0, 299, 300_001] {
        let err = synthetic_tokenizer(bad).unwrap_err();
        assert!(err.to_string().contains(&bad.to_string()), "{err}");
    }
}

#[test]
fn byte_alphabet_is_gpt2s() {
    let alphabet = byte_alphabet();
    assert_eq!(alphabet.len(), 256);
    assert_eq!(alphabet[0], (b'!', '!'));
    let of = |b: u8| alphabet.iter().find(|(x, _)| *x == b).unwrap().1;
    assert_eq!(
        (of(b' '), of(b'\n'), of(b'\t'), of(0)),
        ('Ġ', 'Ċ', 'ĉ', 'Ā')
    );
    let distinct: HashSet<char> = alphabet.iter().map(|&(_, c)| c).collect();
    assert_eq!(distinct.len(), 256);
}

#[test]
fn merges_are_valid_unique_and_deterministic() {
    let files = synthetic_tokenizer(5000).unwrap();
    assert_eq!(files, synthetic_tokenizer(5000).unwrap());
    let vocab = files.tokenizer["model"]["vocab"].as_object().unwrap();
    let merges = merges_of(&files);
    assert_eq!(vocab.len() + SPECIAL_TOKENS.len(), 5000);
    assert_eq!(merges.len(), 5000 - 256 - 3);
    let mut results = HashSet::new();
    for (rank, merge) in merges.iter().enumerate() {
        let (a, b) = merge.split_once(' ').unwrap();
        let id = |t: &str| vocab[t].as_u64().unwrap() as usize;
        let merged = format!("{a}{b}");
        // Both parts exist before the merge that uses them.
        assert!(id(a) < 256 + rank && id(b) < 256 + rank, "{merge}");
        assert_eq!(id(&merged), 256 + rank, "{merge}");
        assert!(results.insert(merged), "duplicate merge result {merge}");
    }
    // The vocabulary's ids are exactly 0..n.
    let ids: HashSet<u64> = vocab.values().map(|v| v.as_u64().unwrap()).collect();
    assert_eq!(ids, (0..vocab.len() as u64).collect());
}

#[test]
fn exact_vocab_sizes_load_and_round_trip() {
    let text = "Hello, world! The model's answer: 42.\n\n\tcafé — naïve 日本語 😀👩‍👩‍👧 \u{0}\u{7f}";
    for size in [MIN_SYNTH_VOCAB, 1000, 32_000, 151_936, MAX_SYNTH_VOCAB] {
        let dir = tempfile::tempdir().unwrap();
        write_synthetic_tokenizer(dir.path(), size).unwrap();
        let tok = TextTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.vocab_size(), size);
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(size as u32 - 3));
        assert_eq!(tok.token_to_id("<|im_end|>"), Some(size as u32 - 1));
        assert_eq!(tok.eos_token_ids(), [size as u32 - 3, size as u32 - 1]);
        let ids = tok.encode(text, true).unwrap();
        assert!(ids.iter().all(|&id| (id as usize) < size));
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
        if size >= 32_000 {
            let english = "The people who made the model should return the answer.";
            let n = tok.encode(english, false).unwrap().len();
            assert!(n <= 12, "common words are single tokens: {n}");
        }
    }
}

#[test]
fn chat_template_renders_chatml() {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_tokenizer(dir.path(), 1000).unwrap();
    let tok = TextTokenizer::from_dir(dir.path()).unwrap();
    let messages = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "Hi!"),
    ];
    let prompt = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
         <|im_start|>assistant\n"
    );
    let ids = tok.encode(&prompt, false).unwrap();
    assert_eq!(ids[0], tok.token_to_id("<|im_start|>").unwrap());
    assert_eq!(
        tok.decode(&ids, true).unwrap(),
        "system\nBe brief.\nuser\nHi!\nassistant\n"
    );
    assert!(!tok
        .apply_chat_template(&messages, false)
        .unwrap()
        .ends_with("assistant\n"));
}

#[test]
fn files_match_what_is_written() {
    let dir = tempfile::tempdir().unwrap();
    write_synthetic_tokenizer(dir.path(), 400).unwrap();
    let files = synthetic_tokenizer(400).unwrap();
    for (name, doc) in files.files() {
        let on_disk: Json =
            serde_json::from_slice(&std::fs::read(dir.path().join(name)).unwrap()).unwrap();
        assert_eq!(&on_disk, doc, "{name}");
    }
    let missing = dir.path().join("no/such/dir");
    let err = write_synthetic_tokenizer(&missing, 400).unwrap_err();
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}
