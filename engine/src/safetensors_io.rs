//! Reading and writing safetensors checkpoints without loading them whole.
//!
//! [`Checkpoint`] opens a Hugging Face checkpoint directory (sharded with
//! `model.safetensors.index.json`, a single `model.safetensors`, or loose `*.safetensors` files),
//! reads and validates only the headers, and then reads one tensor at a time with `pread`: a
//! checkpoint may be larger than RAM, so nothing here maps or reads a whole file.
//! [`SafetensorsWriter`] streams one safetensors file out, one tensor at a time; tile pack import
//! uses it for `dense.safetensors`.

mod checkpoint;
mod header;
mod writer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

use tileflow_spdk::StorageError;

/// The element types a checkpoint may hold (F32, F16, BF16), re-exported from [`crate::dtype`] so
/// readers of this module need only one import.
pub use crate::dtype::Dtype;
pub use checkpoint::Checkpoint;
pub use writer::SafetensorsWriter;

/// Where one tensor lives: its file and absolute byte extent, plus what the bytes mean.
///
/// Invariant for infos produced by [`Checkpoint`]: `len == product(shape) * dtype.size()` and
/// `offset + len` is within the file as it was when the checkpoint was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name as in the checkpoint, e.g. `model.layers.0.mlp.experts.3.down_proj.weight`.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The file holding the tensor's bytes.
    pub file: PathBuf,
    /// Absolute byte offset of the tensor's first byte in `file`.
    pub offset: u64,
    /// Length of the tensor's bytes.
    pub len: u64,
}

impl TensorInfo {
    /// Number of elements (product of `shape`; 1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A safetensors file or checkpoint that could not be read or written, naming the file and, where
/// one is involved, the tensor.
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// A file could not be opened or read; the source names the path and byte range.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The checkpoint path does not exist or cannot be inspected.
    #[error("cannot open checkpoint {}", path.display())]
    OpenPath {
        /// The path given.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The directory has neither an index, nor `model.safetensors`, nor any `*.safetensors` file.
    #[error("no safetensors files in {}", dir.display())]
    NoSafetensors {
        /// The directory searched.
        dir: PathBuf,
    },
    /// `model.safetensors.index.json` could not be read.
    #[error("cannot read checkpoint index {}", path.display())]
    IndexRead {
        /// The index file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// `model.safetensors.index.json` is not valid JSON with a `weight_map` of names to files.
    #[error("checkpoint index {} is not valid: expected JSON with a \"weight_map\" of tensor names to file names", path.display())]
    IndexJson {
        /// The index file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The index maps no tensors at all.
    #[error("checkpoint index {} lists no tensors", path.display())]
    IndexEmpty {
        /// The index file.
        path: PathBuf,
    },
    /// The index names a shard that is not a plain file name in the checkpoint directory.
    #[error("checkpoint index {} maps tensor {tensor} to {shard:?}, which is not a file name in the checkpoint directory", index.display())]
    IndexShardName {
        /// The index file.
        index: PathBuf,
        /// A tensor mapped to that shard.
        tensor: String,
        /// The shard name as written in the index.
        shard: String,
    },
    /// The index maps a tensor to a shard file that does not exist.
    #[error("checkpoint index {} maps tensor {tensor} to {}, which does not exist", index.display(), shard.display())]
    IndexMissingShard {
        /// The index file.
        index: PathBuf,
        /// A tensor mapped to the missing shard.
        tensor: String,
        /// The missing shard file.
        shard: PathBuf,
    },
    /// The index maps a tensor to a shard whose header does not contain it.
    #[error("checkpoint index {} maps tensor {tensor} to {}, but that file has no tensor {tensor}", index.display(), shard.display())]
    IndexTensorMissing {
        /// The index file.
        index: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shard that lacks it.
        shard: PathBuf,
    },
    /// The same tensor name appears in two files of the checkpoint.
    #[error("tensor {tensor} appears in both {} and {}", first.display(), second.display())]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// One file holding it.
        first: PathBuf,
        /// The other file holding it.
        second: PathBuf,
    },
    /// The file is too short to hold even the 8-byte header length.
    #[error("{} is not a safetensors file: it has {file_len} bytes, fewer than the 8-byte header length", file.display())]
    HeaderTooShort {
        /// The file.
        file: PathBuf,
        /// Its length.
        file_len: u64,
    },
    /// The header length field is absurd or points past the end of the file.
    #[error("{}: header length {header_len} is not valid (the limit is 100000000 bytes and the file has {file_len} bytes)", file.display())]
    HeaderLength {
        /// The file.
        file: PathBuf,
        /// The header length the file claims.
        header_len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// The header is not a JSON object (or is not UTF-8).
    #[error("{}: the header is not a valid JSON object", file.display())]
    HeaderJson {
        /// The file.
        file: PathBuf,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// The header's `__metadata__` is not an object of strings.
    #[error("{}: __metadata__ in the header must be an object of string values", file.display())]
    HeaderMetadata {
        /// The file.
        file: PathBuf,
    },
    /// A tensor's header entry lacks `dtype`, `shape` or `data_offsets`, or has the wrong types.
    #[error("tensor {tensor} in {}: header entry must have \"dtype\", \"shape\" and \"data_offsets\"", file.display())]
    HeaderEntry {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The parser's complaint.
        #[source]
        source: serde_json::Error,
    },
    /// A tensor name appears twice in one header.
    #[error("tensor {tensor} appears twice in the header of {}", file.display())]
    HeaderDuplicate {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// A tensor has a dtype the engine does not support.
    #[error("tensor {tensor} in {} has dtype {dtype:?}; supported are F32, F16 and BF16", file.display())]
    UnsupportedDtype {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// The dtype string from the header.
        dtype: String,
    },
    /// A tensor's `data_offsets` run backwards.
    #[error("tensor {tensor} in {}: data_offsets [{begin}, {end}] end before they begin", file.display())]
    OffsetsReversed {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Start offset within the data section.
        begin: u64,
        /// End offset within the data section.
        end: u64,
    },
    /// A tensor's bytes reach past the end of the file: the file is truncated or the header lies.
    #[error("tensor {tensor} in {}: data_offsets [{begin}, {end}] reach past the end of the data section ({data_len} bytes; the file has {file_len} bytes): the file is truncated or its header is wrong", file.display())]
    OffsetsPastEnd {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Start offset within the data section.
        begin: u64,
        /// End offset within the data section.
        end: u64,
        /// Length of the data section (file length minus header).
        data_len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// A tensor's byte length does not match its shape and dtype.
    #[error("tensor {tensor} in {}: shape {shape:?} of {dtype} needs {expected} bytes but data_offsets span {actual}", file.display())]
    ByteLength {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes the shape and dtype need.
        expected: u64,
        /// Bytes the offsets span.
        actual: u64,
    },
    /// A tensor's shape has more bytes than a 64-bit offset can address.
    #[error("tensor {tensor} in {}: shape {shape:?} is too large to address", file.display())]
    ShapeOverflow {
        /// The file.
        file: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// Two tensors' byte ranges overlap.
    #[error("tensors {tensor} and {other} in {} overlap", file.display())]
    Overlap {
        /// The file.
        file: PathBuf,
        /// One tensor.
        tensor: String,
        /// The tensor it overlaps.
        other: String,
    },
    /// A tensor was read from a file that is not part of this checkpoint.
    #[error("tensor {tensor} lives in {}, which is not a file of this checkpoint", file.display())]
    ForeignFile {
        /// The tensor.
        tensor: String,
        /// Its file.
        file: PathBuf,
    },
    /// The destination buffer for a tensor read has the wrong length.
    #[error("tensor {tensor} has {expected} bytes but the buffer to read it into has {actual}")]
    BufferLength {
        /// The tensor.
        tensor: String,
        /// The tensor's length.
        expected: u64,
        /// The buffer's length.
        actual: usize,
    },
    /// Reading a tensor's bytes failed; the source names the file and byte range.
    #[error("cannot read tensor {tensor}")]
    ReadTensor {
        /// The tensor.
        tensor: String,
        /// The storage failure.
        #[source]
        source: StorageError,
    },
    /// A tensor for the writer is invalid (duplicate or reserved name, size overflow).
    #[error("cannot write tensor {tensor} to {}: {reason}", path.display())]
    WriterEntry {
        /// The output file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Tensors were given to the writer out of the declared order, or more than declared.
    #[error("writing {}: expected {expected} next but got tensor {got}", path.display())]
    WriterOrder {
        /// The output file.
        path: PathBuf,
        /// What the writer expected next (a tensor name, or "no more tensors").
        expected: String,
        /// The tensor given.
        got: String,
    },
    /// A tensor given to the writer has the wrong number of bytes for its declared shape.
    #[error("writing tensor {tensor} to {}: expected {expected} bytes but got {actual}", path.display())]
    WriterLength {
        /// The output file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Bytes the declared shape and dtype need.
        expected: u64,
        /// Bytes given.
        actual: usize,
    },
    /// `finish` was called before every declared tensor was written.
    #[error("{} is incomplete: {written} of {total} tensors written, next would be {next}", path.display())]
    WriterIncomplete {
        /// The output file.
        path: PathBuf,
        /// Tensors written.
        written: usize,
        /// Tensors declared.
        total: usize,
        /// The first tensor not written.
        next: String,
    },
    /// An earlier write failed, so the file is corrupt and the writer refuses to go on.
    #[error("{} is unusable after an earlier write error", path.display())]
    WriterFailed {
        /// The output file.
        path: PathBuf,
    },
    /// Creating, writing or syncing the output file failed.
    #[error("writing {} failed at {what}", path.display())]
    WriteIo {
        /// The output file.
        path: PathBuf,
        /// What was being written: "create", "header", "tensor NAME", "sync".
        what: String,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}
