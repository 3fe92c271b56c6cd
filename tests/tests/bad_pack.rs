//! `tilectl run` on damaged tile packs and on bad requests, through the real binary: each one
//! fails with a message naming the file and what in it is wrong (model, layer, expert, offset,
//! extent, tensor), exits non-zero, never panics, and prints no generated text.

use std::fs;
use std::path::PathBuf;

use serde_json::Value;
use tileflow_tests::{fixture, tilectl, tilectl_ok, Run, FAMILIES};

/// The golden long prompt: at prefill it routes to every expert of every fixture, so damage
/// to any expert is met before the first token.
const PROMPT: &str =
    "Once upon a time the engine read the weights from a disk, split every expert \
                      into tiles, and computed one layer at a time, while 42 tokens";

/// A fixture imported as model `m` into a fresh state directory.
struct Pack {
    state: tempfile::TempDir,
}

impl Pack {
    fn import(family: &str) -> Pack {
        let state = tempfile::tempdir().unwrap();
        let dir = fixture(family);
        tilectl_ok(
            state.path(),
            &["model", "import", dir.to_str().unwrap(), "--name", "m"],
        );
        let pack = Pack { state };
        let fresh = pack.run(&[]);
        assert!(
            fresh.ok,
            "{family}: the undamaged pack fails:\n{}",
            fresh.stderr
        );
        pack
    }

    fn file(&self, name: &str) -> PathBuf {
        self.state.path().join("models/m").join(name)
    }

    /// The file's path as tilectl prints it.
    fn shown(&self, name: &str) -> String {
        self.file(name).display().to_string()
    }

    fn manifest(&self) -> Value {
        serde_json::from_slice(&fs::read(self.file("manifest.json")).unwrap()).unwrap()
    }

    fn edit_manifest(&self, edit: impl FnOnce(&mut Value)) {
        let mut m = self.manifest();
        edit(&mut m);
        fs::write(
            self.file("manifest.json"),
            serde_json::to_vec_pretty(&m).unwrap(),
        )
        .unwrap();
    }

    fn truncate(&self, name: &str, len: u64) {
        fs::OpenOptions::new()
            .write(true)
            .open(self.file(name))
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    /// `tilectl run m --prompt PROMPT EXTRA…` (with `--max-tokens 4` unless EXTRA sets it).
    fn run(&self, extra: &[&str]) -> Run {
        let mut args = vec!["run", "m", "--prompt", PROMPT];
        if !extra.contains(&"--max-tokens") {
            args.extend(["--max-tokens", "4"]);
        }
        args.extend(extra);
        tilectl(self.state.path(), &args)
    }

    /// Runs, checks that it failed cleanly, and returns stderr.
    fn run_fails(&self, extra: &[&str]) -> String {
        failed_cleanly(self.run(extra), extra)
    }
}

/// Checks that a run failed without a panic and without printing generated text.
fn failed_cleanly(run: Run, what: &[&str]) -> String {
    assert!(
        !run.ok,
        "{what:?} succeeded:\n{}\n{}",
        run.stdout, run.stderr
    );
    assert!(
        !run.stderr.contains("panicked"),
        "{what:?} panicked:\n{}",
        run.stderr
    );
    assert!(
        run.stdout.trim().is_empty(),
        "{what:?} printed output before failing:\n{}",
        run.stdout
    );
    run.stderr
}

fn assert_names(stderr: &str, parts: &[&str]) {
    for part in parts {
        assert!(stderr.contains(part), "{part:?} not in:\n{stderr}");
    }
}

#[test]
fn a_flipped_expert_byte_is_a_checksum_mismatch_naming_the_expert() {
    for family in FAMILIES {
        let pack = Pack::import(family);
        let manifest = pack.manifest();
        let experts = manifest["experts"].as_array().unwrap();
        // An expert of the last layer: reached only after other experts were read fine.
        let x = &experts[experts.len() - 3];
        let (layer, expert) = (x["layer"].as_u64().unwrap(), x["expert"].as_u64().unwrap());
        let offset = x["offset"].as_u64().unwrap();
        let at = offset + x["bytes"].as_u64().unwrap() / 2;
        let mut tiles = fs::read(pack.file("experts.tiles")).unwrap();
        tiles[usize::try_from(at).unwrap()] ^= 0x10;
        fs::write(pack.file("experts.tiles"), &tiles).unwrap();

        let expect = [
            "checksum mismatch",
            "model m",
            &format!("layer {layer} expert {expert}"),
            &format!("at offset {offset} of {}", pack.shown("experts.tiles")),
        ];
        assert_names(&pack.run_fails(&[]), &expect);
        assert_names(&pack.run_fails(&["--json"]), &expect);
        // One slot: every expert is read, evicted and read again; the same expert is caught.
        assert_names(&pack.run_fails(&["--expert-slots", "1"]), &expect);
    }
}

#[test]
fn truncated_experts_tiles_names_the_file_and_sizes() {
    let pack = Pack::import("olmoe");
    let total = pack.manifest()["experts_file_bytes"].as_u64().unwrap();
    for len in [total - 1, total / 2, 0] {
        pack.truncate("experts.tiles", len);
        let err = pack.run_fails(&[]);
        assert_names(
            &err,
            &[
                "model m",
                &format!(
                    "{} has {len} bytes but the manifest needs {total}",
                    pack.shown("experts.tiles")
                ),
            ],
        );
    }
    fs::remove_file(pack.file("experts.tiles")).unwrap();
    let err = pack.run_fails(&[]);
    assert_names(&err, &["cannot open", &pack.shown("experts.tiles")]);
}

#[test]
fn manifest_extent_edits_name_the_manifest_and_the_extent() {
    let pack = Pack::import("mixtral");
    let original = pack.manifest();
    let x3 = &original["experts"][3];
    let (layer, expert) = (
        x3["layer"].as_u64().unwrap(),
        x3["expert"].as_u64().unwrap(),
    );
    let offset = x3["offset"].as_u64().unwrap();
    let bytes = x3["bytes"].as_u64().unwrap();
    let prev = original["experts"][2]["offset"].as_u64().unwrap();
    let file_bytes = original["experts_file_bytes"].as_u64().unwrap();
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, String)> = vec![
        (
            "misaligned",
            Box::new(move |m| m["experts"][3]["offset"] = (offset + 512).into()),
            format!(
                "experts[3] (layer {layer} expert {expert} at offset {}): the offset is not \
                 4096-aligned",
                offset + 512
            ),
        ),
        (
            "overlapping",
            Box::new(move |m| m["experts"][3]["offset"] = prev.into()),
            format!("experts[3] (layer {layer} expert {expert} at offset {prev}) overlaps"),
        ),
        (
            "out of order",
            Box::new(|m| m["experts"].as_array_mut().unwrap().swap(3, 4)),
            format!("is out of order: expected layer {layer} expert {expert}"),
        ),
        (
            "wrong byte count",
            Box::new(move |m| m["experts"][3]["bytes"] = (bytes - 2).into()),
            format!(
                "experts[3] (layer {layer} expert {expert} at offset {offset}): {} bytes",
                bytes - 2
            ),
        ),
        (
            "past the end",
            Box::new(move |m| m["experts"][3]["offset"] = (file_bytes + 4096).into()),
            format!(
                "experts[3] (layer {layer} expert {expert} at offset {})",
                file_bytes + 4096
            ),
        ),
        (
            "projection shape",
            Box::new(|m| m["experts"][3]["down"]["shape"] = serde_json::json!([1, 1])),
            "Down projection".to_string(),
        ),
        (
            "missing extent",
            Box::new(|m| {
                m["experts"].as_array_mut().unwrap().pop();
            }),
            "expert extents listed".to_string(),
        ),
        (
            "checksum not hex",
            Box::new(|m| m["experts"][3]["xxh3"] = "not-a-checksum!!".into()),
            "xxh3 \"not-a-checksum!!\" is not 16 hex digits".to_string(),
        ),
        (
            "inconsistent spec",
            Box::new(|m| m["spec"]["num_kv_heads"] = 3.into()),
            "spec: `num_kv_heads` (3) must divide num_heads".to_string(),
        ),
    ];
    for (what, edit, message) in cases {
        pack.edit_manifest(|m| {
            *m = original.clone();
            edit(m);
        });
        let err = pack.run_fails(&[]);
        assert!(
            err.contains(&pack.shown("manifest.json")) && err.contains(&message),
            "{what}: {message:?} not in:\n{err}"
        );
        // `model show` reads the same manifest and reports the same.
        let show = failed_cleanly(tilectl(pack.state.path(), &["model", "show", "m"]), &[what]);
        assert!(show.contains(&message), "{what}: model show:\n{show}");
    }
}

#[test]
fn a_manifest_spec_that_disagrees_with_the_weights_is_an_error() {
    let pack = Pack::import("olmoe");
    let original = pack.manifest();
    // One layer fewer (with its extents): the weights of the last layer are left over.
    pack.edit_manifest(|m| {
        let layers = m["spec"]["layers"].as_array_mut().unwrap();
        let last = layers.len() - 1;
        layers.pop();
        m["experts"]
            .as_array_mut()
            .unwrap()
            .retain(|x| x["layer"].as_u64() != Some(last as u64));
    });
    let err = pack.run_fails(&[]);
    assert_names(
        &err,
        &[
            &pack.shown("dense.safetensors"),
            "holds tensor model.layers.2.",
            "the spec and the weights disagree",
        ],
    );
    // A tied LM head: lm_head.weight is left over.
    pack.edit_manifest(|m| {
        *m = original.clone();
        m["spec"]["tie_word_embeddings"] = true.into();
    });
    assert_names(&pack.run_fails(&[]), &["holds tensor lm_head.weight"]);
    // A wider vocabulary: the embedding has another shape.
    pack.edit_manifest(|m| {
        *m = original.clone();
        m["spec"]["vocab_size"] = 512.into();
    });
    assert_names(
        &pack.run_fails(&[]),
        &[
            &pack.shown("dense.safetensors"),
            "tensor model.embed_tokens.weight has shape [448, 64], expected [512, 64]",
        ],
    );
}

#[test]
fn manifest_unknown_fields_and_other_versions_are_named() {
    let pack = Pack::import("qwen3_moe");
    let original = pack.manifest();
    let cases: Vec<(&str, &str)> = vec![
        ("", "unknown field `compression`"),
        ("/experts/5", "unknown field `compression`"),
        ("/experts/5/up", "unknown field `compression`"),
        ("/spec", "unknown field `compression`"),
        ("/spec/moe", "unknown field `compression`"),
        ("/spec/layers/1", "unknown field `compression`"),
    ];
    for (pointer, message) in cases {
        pack.edit_manifest(|m| {
            *m = original.clone();
            m.pointer_mut(pointer).unwrap()["compression"] = "zstd".into();
        });
        let err = pack.run_fails(&[]);
        assert_names(&err, &[&pack.shown("manifest.json"), message]);
    }
    for version in [Value::from(2), Value::from(0), Value::from("1")] {
        pack.edit_manifest(|m| {
            *m = original.clone();
            m["format_version"] = version.clone();
            // A newer format would carry fields this build does not know; the version is
            // what gets reported.
            m["compression"] = "zstd".into();
        });
        let err = pack.run_fails(&[]);
        assert_names(
            &err,
            &[
                &pack.shown("manifest.json"),
                &format!("format_version {version} is not 1"),
            ],
        );
    }
    fs::write(
        pack.file("manifest.json"),
        b"{\"format_version\": 1, \"name\"",
    )
    .unwrap();
    let err = pack.run_fails(&[]);
    assert_names(&err, &[&pack.shown("manifest.json"), "EOF"]);
}

#[test]
fn truncated_dense_safetensors_names_the_file_and_the_tensor() {
    let pack = Pack::import("qwen2_moe");
    let dense = fs::read(pack.file("dense.safetensors")).unwrap();
    let header_len = u64::from_le_bytes(dense[..8].try_into().unwrap());
    let header: Value =
        serde_json::from_slice(&dense[8..8 + usize::try_from(header_len).unwrap()]).unwrap();
    // The tensor stored last is the one a shortened file cuts.
    let (last, _) = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, t)| (name, t["data_offsets"][1].as_u64().unwrap()))
        .max_by_key(|(_, end)| *end)
        .unwrap();
    pack.truncate("dense.safetensors", dense.len() as u64 - 2);
    let err = pack.run_fails(&[]);
    assert_names(
        &err,
        &[
            "model m",
            &pack.shown("dense.safetensors"),
            &format!("tensor {last}"),
            "truncated",
        ],
    );
    pack.truncate("dense.safetensors", 4);
    assert_names(
        &pack.run_fails(&[]),
        &[&pack.shown("dense.safetensors"), "not a safetensors file"],
    );
    fs::remove_file(pack.file("dense.safetensors")).unwrap();
    assert_names(&pack.run_fails(&[]), &[&pack.shown("dense.safetensors")]);
}

#[test]
fn a_missing_tokenizer_json_is_named() {
    let pack = Pack::import("olmoe");
    fs::remove_file(pack.file("tokenizer.json")).unwrap();
    let err = pack.run_fails(&[]);
    assert_names(&err, &[&pack.shown("tokenizer.json")]);
}

#[test]
fn bad_requests_are_clear_errors() {
    let pack = Pack::import("olmoe");
    let s = pack.state.path();
    let vocab = pack.manifest()["spec"]["vocab_size"].as_u64().unwrap();
    let context = pack.manifest()["spec"]["max_position_embeddings"]
        .as_u64()
        .unwrap();

    let err = failed_cleanly(
        tilectl(s, &["run", "nope", "--prompt", "hi"]),
        &["no such model"],
    );
    assert_names(&err, &["no model named \"nope\""]);
    let err = failed_cleanly(
        tilectl(s, &["run", "../m", "--prompt", "hi"]),
        &["bad name"],
    );
    assert_names(&err, &["invalid model name \"../m\""]);

    let ids = format!("1,2,{vocab}");
    let err = failed_cleanly(
        tilectl(s, &["run", "m", "--prompt-ids", &ids]),
        &["id past the vocabulary"],
    );
    assert_names(
        &err,
        &[&format!(
            "prompt token id {vocab} at position 2 is outside the vocabulary of {vocab}"
        )],
    );
    let err = failed_cleanly(
        tilectl(s, &["run", "m", "--prompt-ids", "1,x"]),
        &["id not a number"],
    );
    assert_names(&err, &["--prompt-ids", "\"x\" is not a token id"]);

    let long = "the tile streams from disk ".repeat(100);
    let err = failed_cleanly(
        tilectl(s, &["run", "m", "--prompt", &long]),
        &["prompt past the context"],
    );
    assert_names(
        &err,
        &[&format!("exceeds the model's context of {context}")],
    );
    let too_many = (context + 1).to_string();
    let err = pack.run_fails(&["--max-tokens", &too_many]);
    assert_names(&err, &[&format!("max_tokens {too_many}")]);

    for (flag, value, field) in [
        ("--logprobs", "21", "`logprobs`"),
        ("--max-tokens", "0", "`max_tokens`"),
        ("--top-p", "0", "`top_p`"),
        ("--temperature=-1", "", "`temperature`"),
        ("--stop", "", "`stop[0]`"),
    ] {
        let args: Vec<&str> = [flag, value, "--json"]
            .into_iter()
            .filter(|a| !a.is_empty() || flag == "--stop")
            .collect();
        let err = pack.run_fails(&args);
        assert!(err.starts_with("tilectl: error: "), "{err}");
        assert_names(&err, &["invalid sampling parameter", field]);
    }
    // Refused by the command line itself.
    let err = pack.run_fails(&["--expert-slots", "0"]);
    assert_names(&err, &["--expert-slots", "must be at least 1"]);
}
