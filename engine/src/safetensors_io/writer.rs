//! Streaming writer of one safetensors file.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::header::{byte_len, METADATA_KEY};
use super::{Dtype, SafetensorsError};

/// One declared tensor: its name and the exact number of bytes it must be given.
#[derive(Debug)]
struct Declared {
    name: String,
    len: u64,
}

/// Writes one safetensors file a tensor at a time, so memory use is one tensor, not the file.
///
/// [`create`](Self::create) declares every tensor up front and writes the header (standard layout:
/// 8-byte little-endian header length, JSON header padded with spaces to a multiple of 8, then the
/// data in declaration order with no gaps). Then [`write_tensor`](Self::write_tensor) is called
/// once per tensor in that order, and [`finish`](Self::finish) checks that all were written and
/// fsyncs. A writer dropped before `finish` leaves an incomplete file: callers write into a
/// temporary directory and rename on success.
#[derive(Debug)]
pub struct SafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    declared: Vec<Declared>,
    /// Index of the next tensor to write.
    next: usize,
    /// Set after an I/O error: the file is corrupt and every later call fails.
    failed: bool,
}

impl SafetensorsWriter {
    /// Creates (or truncates) `path` and writes the header for `entries` (name, dtype, shape).
    ///
    /// The header carries `"__metadata__": {"format": "pt"}`, which Hugging Face loaders expect.
    /// Names must be unique and not `__metadata__`.
    pub fn create(
        path: impl AsRef<Path>,
        entries: &[(String, Dtype, Vec<usize>)],
    ) -> Result<Self, SafetensorsError> {
        let path = path.as_ref().to_path_buf();
        let entry_err = |tensor: &str, reason| SafetensorsError::WriterEntry {
            path: path.clone(),
            tensor: tensor.to_owned(),
            reason,
        };
        let mut header = Map::new();
        header.insert(METADATA_KEY.to_owned(), json!({ "format": "pt" }));
        let mut names = HashSet::new();
        let mut declared = Vec::with_capacity(entries.len());
        let mut offset = 0u64;
        for (name, dtype, shape) in entries {
            if name == METADATA_KEY {
                return Err(entry_err(name, "the name is reserved"));
            }
            if !names.insert(name.as_str()) {
                return Err(entry_err(name, "the name is given twice"));
            }
            let len =
                byte_len(*dtype, shape).ok_or_else(|| entry_err(name, "its size overflows"))?;
            let end = offset
                .checked_add(len)
                .ok_or_else(|| entry_err(name, "the file size overflows"))?;
            header.insert(
                name.clone(),
                json!({ "dtype": dtype, "shape": shape, "data_offsets": [offset, end] }),
            );
            declared.push(Declared {
                name: name.clone(),
                len,
            });
            offset = end;
        }
        let mut header_bytes = serde_json::to_vec(&Value::Object(header))
            .map_err(|e| io_err(&path, "header", std::io::Error::other(e)))?;
        let padded = header_bytes.len().next_multiple_of(8);
        header_bytes.resize(padded, b' ');

        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_err(&path, "create", e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        (|| {
            out.write_all(&(header_bytes.len() as u64).to_le_bytes())?;
            out.write_all(&header_bytes)
        })()
        .map_err(|e| io_err(&path, "header", e))?;
        Ok(Self {
            path,
            out,
            declared,
            next: 0,
            failed: false,
        })
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes the bytes of the next declared tensor, which must be called `name` and have exactly
    /// the declared shape's byte length (little-endian elements).
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), SafetensorsError> {
        if self.failed {
            return Err(SafetensorsError::WriterFailed {
                path: self.path.clone(),
            });
        }
        let Some(expected) = self.declared.get(self.next) else {
            return Err(SafetensorsError::WriterOrder {
                path: self.path.clone(),
                expected: "no more tensors".to_owned(),
                got: name.to_owned(),
            });
        };
        if expected.name != name {
            return Err(SafetensorsError::WriterOrder {
                path: self.path.clone(),
                expected: format!("tensor {}", expected.name),
                got: name.to_owned(),
            });
        }
        if u64::try_from(bytes.len()).ok() != Some(expected.len) {
            return Err(SafetensorsError::WriterLength {
                path: self.path.clone(),
                tensor: name.to_owned(),
                expected: expected.len,
                actual: bytes.len(),
            });
        }
        if let Err(e) = self.out.write_all(bytes) {
            self.failed = true;
            return Err(io_err(&self.path, &format!("tensor {name}"), e));
        }
        self.next += 1;
        Ok(())
    }

    /// Checks that every declared tensor was written, flushes and fsyncs the file.
    pub fn finish(mut self) -> Result<(), SafetensorsError> {
        if self.failed {
            return Err(SafetensorsError::WriterFailed { path: self.path });
        }
        if let Some(next) = self.declared.get(self.next) {
            return Err(SafetensorsError::WriterIncomplete {
                written: self.next,
                total: self.declared.len(),
                next: next.name.clone(),
                path: self.path,
            });
        }
        self.out
            .flush()
            .and_then(|()| self.out.get_ref().sync_all())
            .map_err(|e| io_err(&self.path, "sync", e))
    }
}

fn io_err(path: &Path, what: &str, source: std::io::Error) -> SafetensorsError {
    SafetensorsError::WriteIo {
        path: path.to_path_buf(),
        what: what.to_owned(),
        source,
    }
}
