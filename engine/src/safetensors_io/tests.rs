//! Tests of the safetensors reader and writer, against the reference `safetensors` crate.

use std::path::{Path, PathBuf};

use super::*;

/// Deterministic test data of `n` f32 values.
fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n).map(|i| seed + i as f32 * 0.37 - 3.0).collect()
}

type Entries = Vec<(String, Dtype, Vec<usize>)>;

/// Writes `entries` with our writer, each tensor filled from `values`; returns the bytes written.
fn write_ours(path: &Path, entries: &Entries) -> Vec<Vec<u8>> {
    let mut writer = SafetensorsWriter::create(path, entries).unwrap();
    let mut written = Vec::new();
    for (i, (name, dtype, shape)) in entries.iter().enumerate() {
        let bytes = Dtype::from_f32(*dtype, &values(shape.iter().product(), i as f32));
        writer.write_tensor(name, &bytes).unwrap();
        written.push(bytes);
    }
    writer.finish().unwrap();
    written
}

fn sample_entries() -> Entries {
    vec![
        ("z.weight".into(), Dtype::BF16, vec![3, 5]),
        ("a.bias".into(), Dtype::F32, vec![7]),
        ("m.scale".into(), Dtype::F16, vec![2, 2, 3]),
        ("scalar".into(), Dtype::F32, vec![]),
        ("empty".into(), Dtype::BF16, vec![0, 4]),
    ]
}

/// Writes a file by hand: 8-byte header length, `header` JSON padded to 8, then `data`.
fn write_raw(path: &Path, header: &str, data: &[u8]) {
    let mut h = header.as_bytes().to_vec();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// Asserts the error's message mentions every one of `needles`.
fn assert_mentions(err: &SafetensorsError, needles: &[&str]) {
    let msg = err.to_string();
    for needle in needles {
        assert!(msg.contains(needle), "{needle:?} missing from: {msg}");
    }
}

fn open_err(path: &Path) -> SafetensorsError {
    Checkpoint::open(path).expect_err("open must fail")
}

#[test]
fn writer_output_reads_back_byte_exact_with_both_readers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let entries = sample_entries();
    let written = write_ours(&path, &entries);

    let file = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(file[..8].try_into().unwrap());
    assert_eq!(header_len % 8, 0);
    let reference = safetensors::SafeTensors::deserialize(&file).unwrap();
    assert_eq!(reference.len(), entries.len());
    for ((name, dtype, shape), bytes) in entries.iter().zip(&written) {
        let view = reference.tensor(name).unwrap();
        assert_eq!(view.shape(), &shape[..]);
        assert_eq!(view.data(), &bytes[..]);
        assert_eq!(format!("{:?}", view.dtype()), dtype.as_str());
    }

    for open_at in [dir.path(), path.as_path()] {
        let ckpt = Checkpoint::open(open_at).unwrap();
        assert_eq!(ckpt.files(), std::slice::from_ref(&path));
        let names: Vec<_> = ckpt.tensors().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["a.bias", "empty", "m.scale", "scalar", "z.weight"]);
        for ((name, dtype, shape), bytes) in entries.iter().zip(&written) {
            let info = ckpt.get(name).unwrap();
            assert_eq!(
                (info.dtype, &info.shape, info.len),
                (*dtype, shape, bytes.len() as u64)
            );
            assert_eq!(&ckpt.read_raw(info).unwrap(), bytes);
            let mut buf = vec![0u8; bytes.len()];
            ckpt.read_raw_into(info, &mut buf).unwrap();
            assert_eq!(&buf, bytes);
            assert_eq!(ckpt.read_f32(info).unwrap(), Dtype::to_f32(*dtype, bytes));
        }
    }
}

#[test]
fn reads_files_written_by_the_reference_crate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ref.safetensors");
    let a = Dtype::from_f32(Dtype::F16, &values(12, 1.0));
    let b = Dtype::from_f32(Dtype::F32, &values(5, 2.0));
    let views = [
        (
            "layer.a",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![3, 4], &a).unwrap(),
        ),
        (
            "layer.b",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![5], &b).unwrap(),
        ),
    ];
    safetensors::serialize_to_file(views, &None, &path).unwrap();

    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let info = ckpt.get("layer.a").unwrap();
    assert_eq!(
        (info.dtype, info.shape.as_slice()),
        (Dtype::F16, &[3, 4][..])
    );
    assert_eq!(ckpt.read_raw(info).unwrap(), a);
    assert_eq!(
        ckpt.read_f32(ckpt.get("layer.b").unwrap()).unwrap(),
        values(5, 2.0)
    );
}

/// Writes two shards and an index mapping each tensor to its shard.
fn write_sharded(dir: &Path) -> (PathBuf, PathBuf) {
    let one = dir.join("model-00001-of-00002.safetensors");
    let two = dir.join("model-00002-of-00002.safetensors");
    write_ours(&one, &vec![("embed".into(), Dtype::BF16, vec![4, 2])]);
    write_ours(
        &two,
        &vec![
            ("head".into(), Dtype::F32, vec![2, 4]),
            ("norm".into(), Dtype::F16, vec![2]),
        ],
    );
    let index = r#"{"metadata": {"total_size": 52}, "weight_map": {
        "embed": "model-00001-of-00002.safetensors",
        "head": "model-00002-of-00002.safetensors",
        "norm": "model-00002-of-00002.safetensors"}}"#;
    std::fs::write(dir.join("model.safetensors.index.json"), index).unwrap();
    (one, two)
}

#[test]
fn sharded_index_opens_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = write_sharded(dir.path());
    // A stray file beside an index is not part of the checkpoint.
    write_ours(
        &dir.path().join("stray.safetensors"),
        &vec![("embed".into(), Dtype::F32, vec![1])],
    );
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ckpt.files(), &[one.clone(), two.clone()]);
    let names: Vec<_> = ckpt.tensors().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["embed", "head", "norm"]);
    assert_eq!(ckpt.get("embed").unwrap().file, one);
    let head = ckpt.get("head").unwrap();
    assert_eq!(head.file, two);
    assert_eq!(ckpt.read_f32(head).unwrap(), values(8, 0.0));
    let embed = Dtype::from_f32(Dtype::BF16, &values(8, 0.0));
    assert_eq!(ckpt.read_raw(ckpt.get("embed").unwrap()).unwrap(), embed);
}

#[test]
fn without_index_or_model_file_all_safetensors_files_are_read() {
    let dir = tempfile::tempdir().unwrap();
    write_ours(
        &dir.path().join("b.safetensors"),
        &vec![("x".into(), Dtype::F32, vec![2])],
    );
    write_ours(
        &dir.path().join("a.safetensors"),
        &vec![("y".into(), Dtype::F32, vec![2])],
    );
    std::fs::write(dir.path().join("notes.txt"), "not a tensor file").unwrap();
    let ckpt = Checkpoint::open(dir.path()).unwrap();
    let files: Vec<_> = ckpt
        .files()
        .iter()
        .map(|f| f.file_name().unwrap())
        .collect();
    assert_eq!(files, ["a.safetensors", "b.safetensors"]);
    assert_eq!(ckpt.tensors().count(), 2);

    let empty = tempfile::tempdir().unwrap();
    let err = open_err(empty.path());
    assert!(
        matches!(err, SafetensorsError::NoSafetensors { .. }),
        "{err}"
    );
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.safetensors");
    let entries: Entries = vec![
        ("whole".into(), Dtype::F32, vec![4]),
        ("cut".into(), Dtype::BF16, vec![8]),
    ];
    write_ours(&path, &entries);
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 3)
        .unwrap();
    let err = open_err(&path);
    assert!(
        matches!(err, SafetensorsError::OffsetsPastEnd { .. }),
        "{err}"
    );
    // Data is in declaration order, so the last tensor is the one cut.
    assert_mentions(&err, &["cut.safetensors", "tensor cut "]);
}

#[test]
fn header_lying_about_offsets_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "past_end",
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#,
            "w",
        ),
        (
            "reversed",
            r#"{"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#,
            "w",
        ),
        (
            "overlap",
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                "v":{"dtype":"F16","shape":[2],"data_offsets":[4,8]}}"#,
            "v",
        ),
    ];
    for (file, header, tensor) in cases {
        let path = dir.path().join(format!("{file}.safetensors"));
        write_raw(&path, header, &[0u8; 8]);
        let err = open_err(&path);
        assert_mentions(&err, &[&format!("{file}.safetensors"), tensor]);
    }
}

#[test]
fn byte_length_must_match_shape_and_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("len.safetensors");
    write_raw(
        &path,
        r#"{"proj.weight":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}}"#,
        &[0; 16],
    );
    let err = open_err(&path);
    assert!(
        matches!(
            err,
            SafetensorsError::ByteLength {
                expected: 12,
                actual: 8,
                ..
            }
        ),
        "{err}"
    );
    assert_mentions(&err, &["len.safetensors", "proj.weight"]);

    let huge = dir.path().join("huge.safetensors");
    let shape = format!("[{},{}]", u64::MAX, 4);
    write_raw(
        &huge,
        &format!(r#"{{"t":{{"dtype":"F32","shape":{shape},"data_offsets":[0,8]}}}}"#),
        &[0; 8],
    );
    let err = open_err(&huge);
    assert!(
        matches!(err, SafetensorsError::ShapeOverflow { .. }),
        "{err}"
    );
    assert_mentions(&err, &["huge.safetensors", "tensor t "]);
}

#[test]
fn unsupported_dtype_names_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ints.safetensors");
    write_raw(
        &path,
        r#"{"ids":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    let err = open_err(&path);
    assert!(
        matches!(err, SafetensorsError::UnsupportedDtype { .. }),
        "{err}"
    );
    assert_mentions(&err, &["ints.safetensors", "ids", "I64"]);
}

#[test]
fn malformed_headers_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let at = |name: &str| dir.path().join(name);

    std::fs::write(at("tiny.safetensors"), [1u8, 2, 3]).unwrap();
    let err = open_err(&at("tiny.safetensors"));
    assert!(
        matches!(err, SafetensorsError::HeaderTooShort { .. }),
        "{err}"
    );

    let mut absurd = 200_000_000u64.to_le_bytes().to_vec();
    absurd.extend_from_slice(b"{}");
    std::fs::write(at("absurd.safetensors"), &absurd).unwrap();
    let err = open_err(&at("absurd.safetensors"));
    assert!(
        matches!(err, SafetensorsError::HeaderLength { .. }),
        "{err}"
    );

    let mut past = 64u64.to_le_bytes().to_vec();
    past.extend_from_slice(b"{}");
    std::fs::write(at("past.safetensors"), &past).unwrap();
    let err = open_err(&at("past.safetensors"));
    assert!(
        matches!(err, SafetensorsError::HeaderLength { .. }),
        "{err}"
    );

    write_raw(&at("json.safetensors"), r#"{"w": {"dtype": "#, &[]);
    let err = open_err(&at("json.safetensors"));
    assert!(matches!(err, SafetensorsError::HeaderJson { .. }), "{err}");

    write_raw(
        &at("entry.safetensors"),
        r#"{"w":{"dtype":"F32","data_offsets":[0,0]}}"#,
        &[],
    );
    let err = open_err(&at("entry.safetensors"));
    assert!(matches!(err, SafetensorsError::HeaderEntry { .. }), "{err}");
    assert_mentions(&err, &["w"]);

    let twice = r#"{"w":{"dtype":"F32","shape":[],"data_offsets":[0,4]},
                    "w":{"dtype":"F32","shape":[],"data_offsets":[4,8]}}"#;
    write_raw(&at("twice.safetensors"), twice, &[0; 8]);
    let err = open_err(&at("twice.safetensors"));
    assert!(
        matches!(err, SafetensorsError::HeaderDuplicate { .. }),
        "{err}"
    );

    write_raw(
        &at("meta.safetensors"),
        r#"{"__metadata__":{"format":3}}"#,
        &[],
    );
    let err = open_err(&at("meta.safetensors"));
    assert!(
        matches!(err, SafetensorsError::HeaderMetadata { .. }),
        "{err}"
    );

    for name in ["tiny", "absurd", "past", "json", "entry", "twice", "meta"] {
        let err = open_err(&at(&format!("{name}.safetensors")));
        assert_mentions(&err, &[&format!("{name}.safetensors")]);
    }
}

#[test]
fn metadata_and_gaps_are_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gappy.safetensors");
    let header = r#"{"__metadata__":{"format":"pt"},
                     "b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]},
                     "a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
    let mut data = 1.5f32.to_le_bytes().to_vec();
    data.extend_from_slice(&[0; 4]);
    data.extend_from_slice(&(-2.0f32).to_le_bytes());
    write_raw(&path, header, &data);
    let ckpt = Checkpoint::open(&path).unwrap();
    assert_eq!(ckpt.read_f32(ckpt.get("a").unwrap()).unwrap(), [1.5]);
    assert_eq!(ckpt.read_f32(ckpt.get("b").unwrap()).unwrap(), [-2.0]);
}

#[test]
fn index_errors_name_index_shard_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (_, two) = write_sharded(dir.path());
    let index = dir.path().join("model.safetensors.index.json");

    std::fs::remove_file(&two).unwrap();
    let err = open_err(dir.path());
    assert!(
        matches!(err, SafetensorsError::IndexMissingShard { .. }),
        "{err}"
    );
    assert_mentions(&err, &["model-00002-of-00002.safetensors", "head"]);

    write_ours(&two, &vec![("head".into(), Dtype::F32, vec![2, 4])]);
    let err = open_err(dir.path());
    assert!(
        matches!(err, SafetensorsError::IndexTensorMissing { .. }),
        "{err}"
    );
    assert_mentions(&err, &["model-00002-of-00002.safetensors", "norm"]);

    std::fs::write(
        &index,
        r#"{"weight_map": {"head": "../elsewhere.safetensors"}}"#,
    )
    .unwrap();
    let err = open_err(dir.path());
    assert!(
        matches!(err, SafetensorsError::IndexShardName { .. }),
        "{err}"
    );
    assert_mentions(&err, &["elsewhere.safetensors", "head"]);

    std::fs::write(&index, r#"{"weight_map": ["head"]}"#).unwrap();
    let err = open_err(dir.path());
    assert!(matches!(err, SafetensorsError::IndexJson { .. }), "{err}");
    assert_mentions(&err, &["model.safetensors.index.json"]);
}

#[test]
fn duplicate_tensor_across_shards_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    write_ours(
        &dir.path().join("one.safetensors"),
        &vec![("w".into(), Dtype::F32, vec![2])],
    );
    write_ours(
        &dir.path().join("two.safetensors"),
        &vec![("w".into(), Dtype::F16, vec![2])],
    );
    let err = open_err(dir.path());
    assert!(
        matches!(err, SafetensorsError::DuplicateTensor { .. }),
        "{err}"
    );
    assert_mentions(&err, &["one.safetensors", "two.safetensors", "w"]);
}

#[test]
fn reads_check_buffer_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_ours(&path, &sample_entries());
    let ckpt = Checkpoint::open(&path).unwrap();
    let info = ckpt.get("a.bias").unwrap();
    let err = ckpt.read_raw_into(info, &mut [0u8; 3]).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::BufferLength { .. }),
        "{err}"
    );

    let mut foreign = info.clone();
    foreign.file = dir.path().join("other.safetensors");
    let err = ckpt.read_raw(&foreign).unwrap_err();
    assert!(matches!(err, SafetensorsError::ForeignFile { .. }), "{err}");

    // The file shrinks after open: the read fails with a storage error naming the tensor.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(16)
        .unwrap();
    let err = ckpt.read_raw(ckpt.get("z.weight").unwrap()).unwrap_err();
    assert!(matches!(err, SafetensorsError::ReadTensor { .. }), "{err}");
    assert_mentions(&err, &["z.weight"]);
}

#[test]
fn writer_enforces_declared_order_and_lengths() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.safetensors");
    let entries: Entries = vec![
        ("first".into(), Dtype::F32, vec![2]),
        ("second".into(), Dtype::BF16, vec![3]),
    ];
    let mut w = SafetensorsWriter::create(&path, &entries).unwrap();
    let err = w.write_tensor("second", &[0; 6]).unwrap_err();
    assert!(matches!(err, SafetensorsError::WriterOrder { .. }), "{err}");
    assert_mentions(&err, &["out.safetensors", "first", "second"]);
    let err = w.write_tensor("first", &[0; 7]).unwrap_err();
    assert!(
        matches!(
            err,
            SafetensorsError::WriterLength {
                expected: 8,
                actual: 7,
                ..
            }
        ),
        "{err}"
    );
    w.write_tensor("first", &[0; 8]).unwrap();
    let err = SafetensorsWriter::finish(w).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::WriterIncomplete { written: 1, .. }),
        "{err}"
    );
    assert_mentions(&err, &["second"]);

    let mut w = SafetensorsWriter::create(&path, &entries).unwrap();
    w.write_tensor("first", &[0; 8]).unwrap();
    w.write_tensor("second", &[0; 6]).unwrap();
    let err = w.write_tensor("third", &[]).unwrap_err();
    assert!(matches!(err, SafetensorsError::WriterOrder { .. }), "{err}");
    w.finish().unwrap();

    let dup: Entries = vec![
        ("x".into(), Dtype::F32, vec![1]),
        ("x".into(), Dtype::F32, vec![1]),
    ];
    let err = SafetensorsWriter::create(&path, &dup).unwrap_err();
    assert!(matches!(err, SafetensorsError::WriterEntry { .. }), "{err}");
    let reserved: Entries = vec![("__metadata__".into(), Dtype::F32, vec![1])];
    assert!(SafetensorsWriter::create(&path, &reserved).is_err());
}

#[test]
fn conversions_round_to_nearest_even() {
    let one = 1.0f32;
    // bf16 keeps 7 fraction bits: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 and goes to even (1).
    let bf = Dtype::from_f32(
        Dtype::BF16,
        &[
            one + 2f32.powi(-8),
            one + 3.0 * 2f32.powi(-8),
            one + 1.1 * 2f32.powi(-8),
        ],
    );
    assert_eq!(bf, [0x80, 0x3f, 0x82, 0x3f, 0x81, 0x3f]);
    // f16 keeps 10 fraction bits.
    let h = Dtype::from_f32(
        Dtype::F16,
        &[one + 2f32.powi(-11), one + 3.0 * 2f32.powi(-11)],
    );
    assert_eq!(h, [0x00, 0x3c, 0x02, 0x3c]);

    let xs = [0.0, -0.0, 1.0, -2.5, 65504.0, 1e-3, f32::INFINITY];
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let bytes = Dtype::from_f32(dtype, &xs);
        assert_eq!(bytes.len(), xs.len() * dtype.size());
        let back = Dtype::to_f32(dtype, &bytes);
        // Values representable in the target dtype survive exactly.
        assert_eq!(&back[..4], &xs[..4], "{dtype}");
        assert_eq!(Dtype::from_f32(dtype, &back), bytes, "{dtype}");
    }
    assert!(Dtype::to_f32(Dtype::BF16, &Dtype::from_f32(Dtype::BF16, &[f32::NAN]))[0].is_nan());
}

#[test]
fn dtype_strings() {
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        assert_eq!(Dtype::parse(dtype.as_str()), Some(dtype));
        let json = serde_json::to_string(&dtype).unwrap();
        assert_eq!(json, format!("\"{dtype}\""));
        assert_eq!(serde_json::from_str::<Dtype>(&json).unwrap(), dtype);
    }
    assert_eq!(Dtype::parse("I8"), None);
    assert_eq!(Dtype::parse("bf16"), None);
}
