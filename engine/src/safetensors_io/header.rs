//! Parsing and validating one safetensors file's header, reading only the header bytes.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use tileflow_spdk::{FileSource, TileSource};

use super::{Dtype, SafetensorsError, TensorInfo};

/// Largest header we accept, as the reference implementation does: a larger one is corrupt.
pub(super) const MAX_HEADER_LEN: u64 = 100_000_000;

/// Key of the free-form string map allowed beside the tensors.
pub(super) const METADATA_KEY: &str = "__metadata__";

/// A header entry as written; converted to [`TensorInfo`] after validation.
#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The header's top-level object, in file order and with duplicate keys kept, so that a name
/// given twice is an error rather than silently the last one.
struct HeaderEntries(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for HeaderEntries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = HeaderEntries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object mapping tensor names to entries")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<HeaderEntries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(HeaderEntries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

/// Reads and validates the header of the safetensors file behind `source`.
///
/// Reads 8 bytes plus the header, never the data. Checks that the header length is sane, the JSON
/// is an object of well-formed entries with supported dtypes, every tensor's bytes lie within the
/// file, match its shape and dtype, and overlap no other tensor. Returns the tensors in file order
/// with absolute offsets.
pub(super) fn read_header(source: &FileSource) -> Result<Vec<TensorInfo>, SafetensorsError> {
    let file = source.path();
    let file_len = source.len();
    if file_len < 8 {
        return Err(SafetensorsError::HeaderTooShort {
            file: file.to_path_buf(),
            file_len,
        });
    }
    let mut len_bytes = [0u8; 8];
    source.read_at(0, &mut len_bytes)?;
    let header_len = u64::from_le_bytes(len_bytes);
    let bad_length = || SafetensorsError::HeaderLength {
        file: file.to_path_buf(),
        header_len,
        file_len,
    };
    if header_len > MAX_HEADER_LEN || header_len > file_len - 8 {
        return Err(bad_length());
    }
    let mut header = vec![0u8; usize::try_from(header_len).map_err(|_| bad_length())?];
    source.read_at(8, &mut header)?;
    let HeaderEntries(entries) =
        serde_json::from_slice(&header).map_err(|source| SafetensorsError::HeaderJson {
            file: file.to_path_buf(),
            source,
        })?;

    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut seen = HashSet::new();
    let mut tensors = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(SafetensorsError::HeaderDuplicate {
                file: file.to_path_buf(),
                tensor: name,
            });
        }
        if name == METADATA_KEY {
            check_metadata(&value).ok_or_else(|| SafetensorsError::HeaderMetadata {
                file: file.to_path_buf(),
            })?;
            continue;
        }
        let info = validate_entry(source, name, value, data_start, data_len)?;
        tensors.push(info);
    }
    check_overlaps(source, &tensors)?;
    Ok(tensors)
}

/// `Some(())` when `__metadata__` is an object of strings, as the format requires.
fn check_metadata(value: &Value) -> Option<()> {
    value
        .as_object()?
        .values()
        .all(Value::is_string)
        .then_some(())
}

/// Checks one tensor entry against the format and the file's actual length.
fn validate_entry(
    source: &FileSource,
    tensor: String,
    value: Value,
    data_start: u64,
    data_len: u64,
) -> Result<TensorInfo, SafetensorsError> {
    let file = source.path().to_path_buf();
    let raw: RawEntry = match serde_json::from_value(value) {
        Ok(raw) => raw,
        Err(source) => {
            return Err(SafetensorsError::HeaderEntry {
                file,
                tensor,
                source,
            })
        }
    };
    let Some(dtype) = Dtype::parse(&raw.dtype) else {
        return Err(SafetensorsError::UnsupportedDtype {
            file,
            tensor,
            dtype: raw.dtype,
        });
    };
    let [begin, end] = raw.data_offsets;
    if begin > end {
        return Err(SafetensorsError::OffsetsReversed {
            file,
            tensor,
            begin,
            end,
        });
    }
    if end > data_len {
        return Err(SafetensorsError::OffsetsPastEnd {
            file,
            tensor,
            begin,
            end,
            data_len,
            file_len: source.len(),
        });
    }
    let actual = end - begin;
    let Some(expected) = byte_len(dtype, &raw.shape) else {
        return Err(SafetensorsError::ShapeOverflow {
            file,
            tensor,
            shape: raw.shape,
        });
    };
    if expected != actual {
        return Err(SafetensorsError::ByteLength {
            file,
            tensor,
            dtype,
            shape: raw.shape,
            expected,
            actual,
        });
    }
    Ok(TensorInfo {
        name: tensor,
        dtype,
        shape: raw.shape,
        file,
        offset: data_start + begin,
        len: actual,
    })
}

/// Bytes a tensor of `dtype` and `shape` occupies; `None` on overflow.
pub(super) fn byte_len(dtype: Dtype, shape: &[usize]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
}

/// Rejects headers whose tensors share bytes (empty tensors occupy none and never overlap).
fn check_overlaps(source: &FileSource, tensors: &[TensorInfo]) -> Result<(), SafetensorsError> {
    let mut ranges: Vec<&TensorInfo> = tensors.iter().filter(|t| t.len > 0).collect();
    ranges.sort_by_key(|t| t.offset);
    for pair in ranges.windows(2) {
        if pair[0].offset + pair[0].len > pair[1].offset {
            return Err(SafetensorsError::Overlap {
                file: source.path().to_path_buf(),
                tensor: pair[0].name.clone(),
                other: pair[1].name.clone(),
            });
        }
    }
    Ok(())
}
