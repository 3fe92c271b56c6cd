//! A safetensors checkpoint opened for tensor-at-a-time reads.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use tileflow_spdk::{FileSource, TileSource};

use super::header::read_header;
use super::{SafetensorsError, TensorInfo};

/// Name of the Hugging Face shard index.
const INDEX_FILE: &str = "model.safetensors.index.json";
/// Name of a single-file Hugging Face checkpoint.
const SINGLE_FILE: &str = "model.safetensors";

/// The part of `model.safetensors.index.json` we use; `metadata` and the rest are ignored.
#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The tensors of a safetensors checkpoint (one or more files), with their headers validated and
/// one open read-only handle per file.
///
/// Only headers are read at open; tensor bytes are read on demand with `pread`, one tensor at a
/// time, so a checkpoint larger than RAM is fine. Tensor names are unique across all files.
#[derive(Debug)]
pub struct Checkpoint {
    /// Every file of the checkpoint, sorted.
    files: Vec<PathBuf>,
    /// An open handle per file.
    sources: BTreeMap<PathBuf, FileSource>,
    /// Every tensor, by name.
    tensors: BTreeMap<String, TensorInfo>,
}

impl Checkpoint {
    /// Opens a checkpoint directory, or a single `.safetensors` file.
    ///
    /// In a directory, `model.safetensors.index.json` wins (each shard it names is opened, and
    /// every tensor it lists must be in the shard it names); otherwise `model.safetensors`;
    /// otherwise every `*.safetensors` file in it. Every header is validated (see
    /// [`SafetensorsError`] for what is rejected); the same tensor in two files is an error.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, SafetensorsError> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| SafetensorsError::OpenPath {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Self::from_files(vec![path.to_path_buf()]);
        }
        let index = path.join(INDEX_FILE);
        if index.is_file() {
            return Self::from_index(path, &index);
        }
        let single = path.join(SINGLE_FILE);
        if single.is_file() {
            return Self::from_files(vec![single]);
        }
        let files = list_safetensors(path)?;
        if files.is_empty() {
            return Err(SafetensorsError::NoSafetensors {
                dir: path.to_path_buf(),
            });
        }
        Self::from_files(files)
    }

    /// Opens the shards an index names and checks the index against their headers.
    fn from_index(dir: &Path, index: &Path) -> Result<Self, SafetensorsError> {
        let text = std::fs::read(index).map_err(|source| SafetensorsError::IndexRead {
            path: index.to_path_buf(),
            source,
        })?;
        let parsed: ShardIndex =
            serde_json::from_slice(&text).map_err(|source| SafetensorsError::IndexJson {
                path: index.to_path_buf(),
                source,
            })?;
        if parsed.weight_map.is_empty() {
            return Err(SafetensorsError::IndexEmpty {
                path: index.to_path_buf(),
            });
        }
        // Shard name -> one tensor mapped to it, for messages.
        let mut shards: BTreeMap<&str, &str> = BTreeMap::new();
        for (tensor, shard) in &parsed.weight_map {
            shards.entry(shard).or_insert(tensor);
        }
        let mut files = Vec::with_capacity(shards.len());
        for (&shard, &tensor) in &shards {
            let mut parts = Path::new(shard).components();
            if !matches!(
                (parts.next(), parts.next()),
                (Some(Component::Normal(_)), None)
            ) {
                return Err(SafetensorsError::IndexShardName {
                    index: index.to_path_buf(),
                    tensor: tensor.to_owned(),
                    shard: shard.to_owned(),
                });
            }
            let file = dir.join(shard);
            if !file.exists() {
                return Err(SafetensorsError::IndexMissingShard {
                    index: index.to_path_buf(),
                    tensor: tensor.to_owned(),
                    shard: file,
                });
            }
            files.push(file);
        }
        let checkpoint = Self::from_files(files)?;
        for (tensor, shard) in &parsed.weight_map {
            let shard = dir.join(shard);
            if checkpoint.get(tensor).is_none_or(|t| t.file != shard) {
                return Err(SafetensorsError::IndexTensorMissing {
                    index: index.to_path_buf(),
                    tensor: tensor.clone(),
                    shard,
                });
            }
        }
        Ok(checkpoint)
    }

    /// Opens and validates each file and merges their tensors.
    fn from_files(mut files: Vec<PathBuf>) -> Result<Self, SafetensorsError> {
        files.sort();
        files.dedup();
        let mut sources = BTreeMap::new();
        let mut tensors: BTreeMap<String, TensorInfo> = BTreeMap::new();
        for file in &files {
            let source = FileSource::open(file)?;
            for info in read_header(&source)? {
                match tensors.entry(info.name.clone()) {
                    Entry::Vacant(slot) => {
                        slot.insert(info);
                    }
                    Entry::Occupied(slot) => {
                        return Err(SafetensorsError::DuplicateTensor {
                            tensor: info.name,
                            first: slot.get().file.clone(),
                            second: info.file,
                        });
                    }
                }
            }
            sources.insert(file.clone(), source);
        }
        Ok(Self {
            files,
            sources,
            tensors,
        })
    }

    /// Every tensor, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.tensors.values()
    }

    /// The tensor called `name`, if the checkpoint has it.
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The checkpoint's files, sorted.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Reads one tensor's bytes (little-endian, as stored) into a new buffer.
    pub fn read_raw(&self, info: &TensorInfo) -> Result<Vec<u8>, SafetensorsError> {
        let len = usize::try_from(info.len).map_err(|_| SafetensorsError::BufferLength {
            tensor: info.name.clone(),
            expected: info.len,
            actual: usize::MAX,
        })?;
        let mut buf = vec![0u8; len];
        self.read_raw_into(info, &mut buf)?;
        Ok(buf)
    }

    /// Reads one tensor's bytes into `buf`, which must be exactly `info.len` bytes long.
    pub fn read_raw_into(&self, info: &TensorInfo, buf: &mut [u8]) -> Result<(), SafetensorsError> {
        if u64::try_from(buf.len()).ok() != Some(info.len) {
            return Err(SafetensorsError::BufferLength {
                tensor: info.name.clone(),
                expected: info.len,
                actual: buf.len(),
            });
        }
        self.read_range(info, 0, buf)
    }

    /// Reads `buf.len()` bytes starting `at` bytes into a tensor's data (one expert of a fused
    /// 3-D tensor, say).
    pub fn read_range(
        &self,
        info: &TensorInfo,
        at: u64,
        buf: &mut [u8],
    ) -> Result<(), SafetensorsError> {
        let len = buf.len() as u64;
        if at.checked_add(len).is_none_or(|end| end > info.len) {
            return Err(SafetensorsError::BufferLength {
                tensor: info.name.clone(),
                expected: info.len.saturating_sub(at),
                actual: buf.len(),
            });
        }
        let source = self
            .sources
            .get(&info.file)
            .ok_or_else(|| SafetensorsError::ForeignFile {
                tensor: info.name.clone(),
                file: info.file.clone(),
            })?;
        source
            .read_at(info.offset + at, buf)
            .map_err(|source| SafetensorsError::ReadTensor {
                tensor: info.name.clone(),
                source,
            })
    }

    /// Reads one tensor and converts it to f32 (exact for F32, F16 and BF16).
    pub fn read_f32(&self, info: &TensorInfo) -> Result<Vec<f32>, SafetensorsError> {
        Ok(info.dtype.to_f32(&self.read_raw(info)?))
    }
}

/// The regular `*.safetensors` files directly in `dir`.
fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>, SafetensorsError> {
    let open_err = |source| SafetensorsError::OpenPath {
        path: dir.to_path_buf(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(open_err)? {
        let path = entry.map_err(open_err)?.path();
        if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
            files.push(path);
        }
    }
    Ok(files)
}
