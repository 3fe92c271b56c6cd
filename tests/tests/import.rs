//! `tilectl model import|list|show|rm` on the golden checkpoints: byte-exact packs, and clear
//! errors with nothing left behind on bad input.

use std::fs;
use std::path::Path;

use safetensors::SafeTensors;
use serde_json::Value;
use tileflow_tests::{fixture, tilectl, tilectl_ok, FAMILIES};

/// Every tensor of a checkpoint directory, by name, read with the `safetensors` crate.
fn checkpoint_tensors(dir: &Path) -> Vec<(String, Vec<usize>, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let bytes = fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                out.push((name, view.shape().to_vec(), view.data().to_vec()));
            }
        }
    }
    out
}

#[test]
fn imported_packs_hold_the_checkpoint_byte_for_byte() {
    let state = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        tilectl_ok(
            state.path(),
            &[
                "model",
                "import",
                fixture(family).to_str().unwrap(),
                "--name",
                family,
            ],
        );
    }
    let list: Value =
        serde_json::from_str(&tilectl_ok(state.path(), &["model", "list", "--json"]).stdout)
            .unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    let mut sorted = FAMILIES.to_vec();
    sorted.sort();
    assert_eq!(names, sorted);

    for family in FAMILIES {
        let show: Value = serde_json::from_str(
            &tilectl_ok(state.path(), &["model", "show", family, "--json"]).stdout,
        )
        .unwrap();
        assert_eq!(show["family"], family);
        let pack = state.path().join("models").join(family);
        let manifest: Value =
            serde_json::from_slice(&fs::read(pack.join("manifest.json")).unwrap()).unwrap();
        let tiles = fs::read(pack.join("experts.tiles")).unwrap();
        assert_eq!(
            tiles.len() % 4096,
            0,
            "{family}: experts.tiles is not whole blocks"
        );
        let source = checkpoint_tensors(&fixture(family));
        let find = |name: &str| source.iter().find(|(n, _, _)| n == name);

        // Dense tensors: the same bytes under the same names.
        let dense_bytes = fs::read(pack.join("dense.safetensors")).unwrap();
        let dense = SafeTensors::deserialize(&dense_bytes).unwrap();
        for (name, view) in dense.tensors() {
            let (_, shape, data) =
                find(&name).unwrap_or_else(|| panic!("{family}: {name} not in checkpoint"));
            assert_eq!(view.shape(), shape.as_slice(), "{family}: {name}");
            assert_eq!(view.data(), data.as_slice(), "{family}: {name}");
        }

        // Experts: each extent aligned, checksummed, and equal to the checkpoint's projections.
        let moe = if family == "mixtral" {
            "block_sparse_moe"
        } else {
            "mlp"
        };
        let experts = manifest["experts"].as_array().unwrap();
        assert_eq!(
            experts.len(),
            if family == "qwen2_moe" { 16 } else { 24 },
            "{family}"
        );
        for x in experts {
            let (layer, expert) = (
                x["layer"].as_u64().unwrap(),
                x["expert"].as_u64().unwrap() as usize,
            );
            let off = x["offset"].as_u64().unwrap() as usize;
            let len = x["bytes"].as_u64().unwrap() as usize;
            assert_eq!(off % 4096, 0);
            let extent = &tiles[off..off + len];
            let digest = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(extent));
            assert_eq!(x["xxh3"].as_str().unwrap(), digest);
            for (proj, leaf, half) in [
                ("gate", "gate_proj", 0),
                ("up", "up_proj", 1),
                ("down", "down_proj", 0),
            ] {
                let p = &x[proj];
                let at = p["offset"].as_u64().unwrap() as usize;
                let n: usize = p["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .product();
                let got = &extent[at..at + n * (len / (3 * n))];
                let leaf = match (family, leaf) {
                    ("mixtral", "gate_proj") => "w1",
                    ("mixtral", "up_proj") => "w3",
                    ("mixtral", "down_proj") => "w2",
                    (_, l) => l,
                };
                let want: Vec<u8> = match find(&format!(
                    "model.layers.{layer}.{moe}.experts.{expert}.{leaf}.weight"
                )) {
                    Some((_, _, data)) => data.clone(),
                    None => {
                        // transformers 5's fused layout: gate_up [E, 2I, H], down [E, H, I].
                        let fused = if proj == "down" {
                            "down_proj"
                        } else {
                            "gate_up_proj"
                        };
                        let (_, _, data) =
                            find(&format!("model.layers.{layer}.{moe}.experts.{fused}")).unwrap();
                        let per = data.len() / 8 / if proj == "down" { 1 } else { 2 };
                        let start = if proj == "down" {
                            expert * per
                        } else {
                            (2 * expert + half) * per
                        };
                        data[start..start + per].to_vec()
                    }
                };
                assert_eq!(
                    got,
                    want.as_slice(),
                    "{family} layer {layer} expert {expert} {proj}"
                );
            }
        }
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            assert_eq!(
                fs::read(pack.join(f)).unwrap(),
                fs::read(fixture(family).join(f)).unwrap(),
                "{f}"
            );
        }
    }

    tilectl_ok(state.path(), &["model", "rm", "olmoe"]);
    let run = tilectl(state.path(), &["model", "show", "olmoe"]);
    assert!(
        !run.ok && run.stderr.contains("no model named \"olmoe\""),
        "{}",
        run.stderr
    );
    let again = tilectl(
        state.path(),
        &[
            "model",
            "import",
            fixture("mixtral").to_str().unwrap(),
            "--name",
            "mixtral",
        ],
    );
    assert!(
        !again.ok && again.stderr.contains("already exists"),
        "{}",
        again.stderr
    );
}

/// A copy of a fixture that a test may damage.
fn damaged_copy(family: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in fs::read_dir(fixture(family)).unwrap() {
        let path = entry.unwrap().path();
        fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// Rewrites `model.safetensors` of `dir` after `edit` changes its tensor list.
fn rewrite(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    let mut tensors = checkpoint_tensors(dir);
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, s, d)| {
            let dtype = if d.len() == 4 * s.iter().product::<usize>() {
                safetensors::Dtype::F32
            } else {
                safetensors::Dtype::F16
            };
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), d).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, &dir.join("model.safetensors")).unwrap();
}

/// Importing `dir` fails, names every `needle` in its message, and leaves no model behind.
fn import_fails(dir: &Path, needles: &[&str]) {
    let state = tempfile::tempdir().unwrap();
    let run = tilectl(
        state.path(),
        &["model", "import", dir.to_str().unwrap(), "--name", "bad"],
    );
    assert!(!run.ok, "import of a bad checkpoint succeeded");
    for needle in needles {
        assert!(
            run.stderr.contains(needle),
            "error does not name {needle:?}:\n{}",
            run.stderr
        );
    }
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    let models = state.path().join("models");
    let left: Vec<_> = fs::read_dir(&models)
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "import left {left:?} behind");
}

#[test]
fn truncated_safetensors_names_file_and_tensor() {
    let dir = damaged_copy("olmoe");
    let path = dir.path().join("model.safetensors");
    let len = fs::metadata(&path).unwrap().len();
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 1000)
        .unwrap();
    import_fails(
        dir.path(),
        &["model.safetensors", "tensor model.layers.2.", "truncated"],
    );
}

#[test]
fn header_lying_about_offsets_is_refused() {
    let dir = damaged_copy("olmoe");
    let path = dir.path().join("model.safetensors");
    let mut bytes = fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let mut json: Value = serde_json::from_str(&header).unwrap();
    json["lm_head.weight"]["data_offsets"][1] = Value::from(1u64 << 40);
    let mut text = serde_json::to_string(&json).unwrap();
    while text.len() < n {
        text.push(' ');
    }
    if text.len() == n {
        bytes[8..8 + n].copy_from_slice(text.as_bytes());
        fs::write(&path, bytes).unwrap();
        import_fails(dir.path(), &["model.safetensors", "lm_head.weight"]);
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = damaged_copy("mixtral");
    rewrite(dir.path(), |t| {
        t.retain(|(n, _, _)| n != "model.layers.1.block_sparse_moe.experts.3.w2.weight")
    });
    import_fails(
        dir.path(),
        &["missing tensor model.layers.1.block_sparse_moe.experts.3.w2.weight"],
    );
}

#[test]
fn unexpected_tensor_is_named() {
    let dir = damaged_copy("mixtral");
    rewrite(dir.path(), |t| {
        t.push((
            "model.layers.0.mlp.extra.weight".into(),
            vec![2],
            vec![0; 8],
        ))
    });
    import_fails(
        dir.path(),
        &[
            "unexpected tensor model.layers.0.mlp.extra.weight",
            "model.safetensors",
        ],
    );
}

#[test]
fn wrong_shape_is_named() {
    let dir = damaged_copy("mixtral");
    rewrite(dir.path(), |t| {
        let x = t
            .iter_mut()
            .find(|(n, _, _)| n == "model.layers.0.self_attn.k_proj.weight")
            .unwrap();
        x.1 = vec![x.1[1], x.1[0]];
    });
    import_fails(
        dir.path(),
        &["model.layers.0.self_attn.k_proj.weight", "shape"],
    );
}

#[test]
fn unsupported_config_names_the_field() {
    let dir = damaged_copy("olmoe");
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    config["rope_scaling"] = serde_json::json!({"rope_type": "longrope", "factor": 2.0});
    fs::write(&path, config.to_string()).unwrap();
    import_fails(
        dir.path(),
        &["config.json", "rope_scaling.rope_type", "longrope"],
    );

    config["rope_scaling"] = Value::Null;
    config["hidden_act"] = "gelu".into();
    fs::write(&path, config.to_string()).unwrap();
    import_fails(dir.path(), &["hidden_act"]);
}

#[test]
fn missing_shard_is_named() {
    let dir = damaged_copy("qwen2_moe");
    fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    import_fails(dir.path(), &["model-00002-of-00002.safetensors"]);
}
