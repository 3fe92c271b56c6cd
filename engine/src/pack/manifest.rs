//! `manifest.json` of a tile pack: the model spec and where every routed expert lives in
//! `experts.tiles`.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dtype::Dtype;
use crate::spec::ModelSpec;

/// The manifest format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Every expert extent starts at a multiple of this (the O_DIRECT / NVMe block granule).
pub const EXTENT_ALIGN: u64 = 4096;
/// File names inside a pack directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Dense (non-expert) weights.
pub const DENSE_FILE: &str = "dense.safetensors";
/// Routed-expert extents.
pub const EXPERTS_FILE: &str = "experts.tiles";

/// Why a manifest could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The manifest path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The JSON does not describe a manifest.
    #[error("{path} is not a valid tile pack manifest: {reason}")]
    Parse {
        /// The manifest path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// One projection of an expert inside its extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectionExtent {
    /// Byte offset from the start of the expert's extent.
    pub offset: u64,
    /// Row-major `[rows, cols]` (the `nn.Linear` weight: `[out_features, in_features]`).
    pub shape: [usize; 2],
}

/// Which projection of a SwiGLU expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Projection {
    /// `gate_proj` / `w1`: `[intermediate, hidden]`.
    Gate,
    /// `up_proj` / `w3`: `[intermediate, hidden]`.
    Up,
    /// `down_proj` / `w2`: `[hidden, intermediate]`.
    Down,
}

impl Projection {
    /// All three, in extent order.
    pub const ALL: [Projection; 3] = [Projection::Gate, Projection::Up, Projection::Down];
}

/// One routed expert: a contiguous, [`EXTENT_ALIGN`]-aligned extent of `experts.tiles`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertExtent {
    /// Decoder layer.
    pub layer: usize,
    /// Expert index within the layer.
    pub expert: usize,
    /// Byte offset in `experts.tiles` (a multiple of [`EXTENT_ALIGN`]).
    pub offset: u64,
    /// Bytes of weights (gate + up + down), without the alignment padding.
    pub bytes: u64,
    /// xxh3-64 of those bytes, as 16 lowercase hex digits.
    pub xxh3: String,
    /// gate_proj.
    pub gate: ProjectionExtent,
    /// up_proj.
    pub up: ProjectionExtent,
    /// down_proj.
    pub down: ProjectionExtent,
}

impl ExpertExtent {
    /// The extent of one projection.
    pub fn projection(&self, p: Projection) -> &ProjectionExtent {
        match p {
            Projection::Gate => &self.gate,
            Projection::Up => &self.up,
            Projection::Down => &self.down,
        }
    }
}

/// A source file the pack was made from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceDigest {
    /// File name relative to the checkpoint directory.
    pub file: String,
    /// Its size in bytes.
    pub bytes: u64,
    /// xxh3-64 of its safetensors header (cheap identity; the data is covered per expert).
    pub header_xxh3: String,
}

/// The manifest of a tile pack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT_VERSION`] of the writer.
    pub format_version: u32,
    /// The model's name in the store.
    pub name: String,
    /// The model's architecture.
    pub spec: ModelSpec,
    /// Element type of the routed experts in `experts.tiles`.
    pub expert_dtype: Dtype,
    /// Size of `experts.tiles` in bytes.
    pub experts_file_bytes: u64,
    /// Every routed expert, ordered by (layer, expert).
    pub experts: Vec<ExpertExtent>,
    /// Where the weights came from (`synth:<preset>:seed=<n>` for synthesized models).
    pub source: String,
    /// Source files and their digests (empty for synthesized models).
    pub source_files: Vec<SourceDigest>,
    /// The TileFlow version that wrote the pack.
    pub created_by: String,
}

impl Manifest {
    /// Reads and checks `manifest.json`.
    pub fn read(path: &Path) -> Result<Manifest, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let parse = |reason: String| ManifestError::Parse {
            path: path.display().to_string(),
            reason,
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
        if m.format_version != FORMAT_VERSION {
            return Err(parse(format!(
                "format_version {} is not {FORMAT_VERSION}, the version this build reads",
                m.format_version
            )));
        }
        m.check().map_err(parse)?;
        Ok(m)
    }

    /// Checks the extents against the spec: one per (MoE layer, expert), aligned, in bounds,
    /// not overlapping, projection shapes as the spec says.
    pub fn check(&self) -> Result<(), String> {
        let spec = &self.spec;
        let (h, i) = (spec.hidden_size, spec.moe.expert_intermediate);
        let want: Vec<(usize, usize)> = spec
            .moe_layers()
            .flat_map(|l| (0..spec.moe.num_experts).map(move |e| (l, e)))
            .collect();
        if want.len() != self.experts.len() {
            return Err(format!(
                "{} expert extents listed, the spec has {}",
                self.experts.len(),
                want.len()
            ));
        }
        let proj_bytes = (h * i * self.expert_dtype.size()) as u64;
        let mut end = 0u64;
        for (x, (layer, expert)) in self.experts.iter().zip(want) {
            let at = format!("expert extent layer {} expert {}", x.layer, x.expert);
            if (x.layer, x.expert) != (layer, expert) {
                return Err(format!(
                    "{at} is out of order: expected layer {layer} expert {expert}"
                ));
            }
            if x.offset % EXTENT_ALIGN != 0 {
                return Err(format!(
                    "{at}: offset {} is not {EXTENT_ALIGN}-aligned",
                    x.offset
                ));
            }
            if x.offset < end {
                return Err(format!(
                    "{at}: offset {} overlaps the previous extent",
                    x.offset
                ));
            }
            if x.bytes != 3 * proj_bytes {
                return Err(format!(
                    "{at}: {} bytes, expected {}",
                    x.bytes,
                    3 * proj_bytes
                ));
            }
            end = x.offset + x.bytes;
            if end > self.experts_file_bytes {
                return Err(format!(
                    "{at}: ends at {end}, past experts.tiles ({} bytes)",
                    self.experts_file_bytes
                ));
            }
            for (p, shape) in [
                (Projection::Gate, [i, h]),
                (Projection::Up, [i, h]),
                (Projection::Down, [h, i]),
            ] {
                let pe = x.projection(p);
                if pe.shape != shape || pe.offset + proj_bytes > x.bytes {
                    return Err(format!(
                        "{at}: {p:?} projection {pe:?} does not fit shape {shape:?}"
                    ));
                }
            }
            if x.xxh3.len() != 16 || !x.xxh3.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{at}: xxh3 {:?} is not 16 hex digits", x.xxh3));
            }
        }
        Ok(())
    }

    /// The extent of (layer, expert), if that layer has routed experts.
    pub fn extent(&self, layer: usize, expert: usize) -> Option<&ExpertExtent> {
        let idx = self
            .experts
            .binary_search_by(|x| (x.layer, x.expert).cmp(&(layer, expert)))
            .ok()?;
        self.experts.get(idx)
    }
}

/// Formats an xxh3-64 digest as stored in manifests.
pub fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Rounds `n` up to the next multiple of [`EXTENT_ALIGN`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(EXTENT_ALIGN) * EXTENT_ALIGN
}
