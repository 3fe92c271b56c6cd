//! Writing a tile pack from any source of tensors (a hub checkpoint, the synthesizer).
//!
//! Memory stays bounded: dense tensors go through one at a time, experts in batches of at most
//! [`BATCH_BYTES`], read (or generated) in parallel and written in order.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use rayon::prelude::*;

use crate::dtype::Dtype;
use crate::pack::manifest::{
    align_up, xxh3_hex, ExpertExtent, Manifest, Projection, ProjectionExtent, SourceDigest,
    DENSE_FILE, EXPERTS_FILE, FORMAT_VERSION, MANIFEST_FILE,
};
use crate::pack::names::projection_shape;
use crate::safetensors_io::SafetensorsWriter;
use crate::spec::ModelSpec;
use tileflow_spdk::AlignedBuf;

/// Upper bound on the expert bytes held in memory at once while packing.
pub const BATCH_BYTES: usize = 256 << 20;

/// Why a pack could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PackError {
    /// The source is not a valid model of its spec (missing, unexpected or ill-shaped tensors).
    #[error("{0}")]
    Source(String),
    /// Reading the source failed.
    #[error(transparent)]
    Read(#[from] crate::safetensors_io::SafetensorsError),
    /// Writing the pack failed.
    #[error("cannot write {path}")]
    Write {
        /// The file being written.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Something else about the source (tokenizer, config) failed.
    #[error("{what}")]
    Other {
        /// What failed, naming the input.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A model's tensors, in the hub's names, as a pack writer consumes them.
pub trait PackSource: Sync {
    /// The architecture.
    fn spec(&self) -> &ModelSpec;
    /// Element type of the routed experts.
    fn expert_dtype(&self) -> Dtype;
    /// Every dense tensor: name, element type and shape, in the order they are written.
    fn dense_entries(&self) -> Vec<(String, Dtype, Vec<usize>)>;
    /// The bytes of one dense tensor.
    fn read_dense(&self, name: &str) -> Result<Vec<u8>, PackError>;
    /// Fills `out` (exactly rows*cols*size bytes) with one expert projection.
    fn read_expert(
        &self,
        layer: usize,
        expert: usize,
        proj: Projection,
        out: &mut [u8],
    ) -> Result<(), PackError>;
    /// Writes the non-tensor files (config.json, tokenizer files) into `dir`.
    fn write_aux_files(&self, dir: &Path) -> Result<(), PackError>;
    /// Where the weights come from, for the manifest.
    fn describe(&self) -> (String, Vec<SourceDigest>);
}

/// Progress of a pack write, in bytes of tensors.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Bytes written so far.
    pub done: u64,
    /// Bytes to write in all.
    pub total: u64,
}

/// Writes `source` as a tile pack named `name` into `dir` (an empty directory), returning
/// its manifest. `progress` is called after each tensor or batch of experts.
pub fn write_pack(
    source: &dyn PackSource,
    name: &str,
    dir: &Path,
    progress: &(dyn Fn(Progress) + Sync),
) -> Result<Manifest, PackError> {
    let spec = source.spec();
    let dtype = source.expert_dtype();
    let dense = source.dense_entries();
    let proj_bytes = projection_shape(spec, Projection::Gate)
        .iter()
        .product::<usize>()
        * dtype.size();
    let expert_bytes = 3 * proj_bytes;
    let experts: Vec<(usize, usize)> = spec
        .moe_layers()
        .flat_map(|l| (0..spec.moe.num_experts).map(move |e| (l, e)))
        .collect();
    let dense_total: u64 = dense
        .iter()
        .map(|(_, d, s)| (s.iter().product::<usize>() * d.size()) as u64)
        .sum();
    let total = dense_total + (experts.len() * expert_bytes) as u64;
    let mut done = 0u64;

    // Dense weights, one tensor at a time.
    let dense_path = dir.join(DENSE_FILE);
    let mut writer = SafetensorsWriter::create(&dense_path, &dense)?;
    for (tensor, _, _) in &dense {
        let bytes = source.read_dense(tensor)?;
        writer.write_tensor(tensor, &bytes)?;
        done += bytes.len() as u64;
        progress(Progress { done, total });
    }
    writer.finish()?;

    // Experts: each extent 4096-aligned and padded to whole blocks, so experts.tiles is written
    // with O_DIRECT (where the file system allows it) from aligned buffers. Two batches are in
    // flight: one is read or generated in parallel while the other is checksummed and written.
    let experts_path = dir.join(EXPERTS_FILE);
    let werr = |source| PackError::Write {
        path: experts_path.display().to_string(),
        source,
    };
    let file = open_direct(&experts_path).map_err(werr)?;
    let padded = align_up(expert_bytes as u64) as usize;
    let per_batch = (BATCH_BYTES / 2 / padded.max(1)).max(1);
    let batches: Vec<&[(usize, usize)]> = experts.chunks(per_batch).collect();
    let alloc = |n: usize| {
        AlignedBuf::new((n * padded).max(1)).map_err(|e| PackError::Other {
            what: format!("cannot allocate {} bytes of expert buffers", n * padded),
            source: Box::new(e),
        })
    };
    let first = batches.first().map_or(0, |b| b.len());
    let (mut current, mut next) = (alloc(first)?, alloc(first)?);
    let fill = |buf: &mut AlignedBuf, batch: &[(usize, usize)]| -> Result<(), PackError> {
        buf.par_chunks_mut(padded)
            .zip(batch)
            .try_for_each(|(slot, &(layer, expert))| {
                for (k, proj) in Projection::ALL.into_iter().enumerate() {
                    source.read_expert(
                        layer,
                        expert,
                        proj,
                        &mut slot[k * proj_bytes..(k + 1) * proj_bytes],
                    )?;
                }
                Ok(())
            })
    };
    if let Some(b) = batches.first() {
        fill(&mut current, b)?;
    }
    let mut extents = Vec::with_capacity(experts.len());
    let proj = |k: usize, p: Projection| ProjectionExtent {
        offset: (k * proj_bytes) as u64,
        shape: projection_shape(spec, p),
    };
    let mut offset = 0u64;
    for (n, batch) in batches.iter().enumerate() {
        let bytes = batch.len() * padded;
        let (written, filled) = rayon::join(
            || -> Result<Vec<String>, std::io::Error> {
                file.write_all_at(&current[..bytes], offset)?;
                Ok(current[..bytes]
                    .chunks(padded)
                    .map(|slot| xxh3_hex(&slot[..expert_bytes]))
                    .collect())
            },
            || match batches.get(n + 1) {
                Some(b) => fill(&mut next, b),
                None => Ok(()),
            },
        );
        let digests = written.map_err(werr)?;
        filled?;
        for (k, (&(layer, expert), xxh3)) in batch.iter().zip(digests).enumerate() {
            extents.push(ExpertExtent {
                layer,
                expert,
                offset: offset + (k * padded) as u64,
                bytes: expert_bytes as u64,
                xxh3,
                gate: proj(0, Projection::Gate),
                up: proj(1, Projection::Up),
                down: proj(2, Projection::Down),
            });
        }
        offset += bytes as u64;
        done += (batch.len() * expert_bytes) as u64;
        progress(Progress { done, total });
        std::mem::swap(&mut current, &mut next);
    }
    let file_bytes = offset;
    file.set_len(file_bytes).map_err(werr)?;

    source.write_aux_files(dir)?;
    let (source_desc, source_files) = source.describe();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: name.to_string(),
        spec: spec.clone(),
        expert_dtype: dtype,
        experts_file_bytes: file_bytes,
        experts: extents,
        source: source_desc,
        source_files,
        created_by: format!("tileflow {}", env!("CARGO_PKG_VERSION")),
    };
    manifest.check().map_err(PackError::Source)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| PackError::Other {
        what: "cannot encode the manifest".into(),
        source: Box::new(e),
    })?;
    std::fs::write(&manifest_path, json).map_err(|source| PackError::Write {
        path: manifest_path.display().to_string(),
        source,
    })?;
    Ok(manifest)
}

/// Creates `path` for writing with O_DIRECT (no page-cache copy: the pack is written at the
/// disk's speed), or plainly where the file system refuses O_DIRECT (tmpfs, some overlays).
fn open_direct(path: &Path) -> std::io::Result<File> {
    let open = |flags: i32| {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(flags)
            .open(path)
    };
    let direct = match open(libc::O_DIRECT) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return open(0),
        other => other?,
    };
    // Some file systems accept the flag and refuse the writes: probe with one aligned block
    // (the first batch overwrites it).
    let probe = AlignedBuf::new(4096).map_err(|e| std::io::Error::other(e.to_string()))?;
    match direct.write_all_at(&probe, 0) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => open(0),
        Err(e) => Err(e),
        Ok(()) => Ok(direct),
    }
}
