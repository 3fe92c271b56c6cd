//! `manifest.json` of a tile pack: the model spec and where every routed expert lives in
//! `experts.tiles`.

use std::io::Read;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

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
/// Largest manifest read: a pack of 16k experts needs about 8 MiB.
pub const MAX_MANIFEST_BYTES: u64 = 256 << 20;

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
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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
#[serde(deny_unknown_fields)]
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

/// Just the version of a manifest, read before the rest so that a manifest of another format
/// is reported as such rather than as a field this build does not know.
#[derive(Deserialize)]
struct VersionOnly {
    format_version: Option<Value>,
}

impl Manifest {
    /// Reads and checks `manifest.json`.
    pub fn read(path: &Path) -> Result<Manifest, ManifestError> {
        let read_err = |source| ManifestError::Read {
            path: path.display().to_string(),
            source,
        };
        let parse = |reason: String| ManifestError::Parse {
            path: path.display().to_string(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut text = String::new();
        file.take(MAX_MANIFEST_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(parse(format!(
                "it is larger than {MAX_MANIFEST_BYTES} bytes"
            )));
        }
        let version: VersionOnly = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
        match version.format_version {
            Some(v) if v.as_u64() == Some(u64::from(FORMAT_VERSION)) => {}
            Some(v) => {
                return Err(parse(format!(
                    "format_version {v} is not {FORMAT_VERSION}, the version this build reads"
                )))
            }
            None => return Err(parse("missing field `format_version`".into())),
        }
        let m: Manifest = serde_json::from_str(&text).map_err(|e| parse(e.to_string()))?;
        m.check().map_err(parse)?;
        Ok(m)
    }

    /// Checks the manifest against itself and its spec: a valid spec; one extent per
    /// (MoE layer, expert) in that order; each aligned, of the spec's size, inside
    /// `experts_file_bytes` and after the previous one; its projections of the spec's shapes,
    /// inside it and apart; its checksum well formed. Every size is checked before it is used,
    /// so nothing here overflows or allocates by a number read from the file.
    pub fn check(&self) -> Result<(), String> {
        let spec = &self.spec;
        spec.validate().map_err(|fault| format!("spec: {fault}"))?;
        let (h, i) = (spec.hidden_size, spec.moe.expert_intermediate);
        let moe_layers = spec.moe_layers().count();
        let expected = moe_layers.checked_mul(spec.moe.num_experts);
        if expected != Some(self.experts.len()) {
            return Err(format!(
                "{} expert extents listed, the spec has {moe_layers} MoE layers of {} experts",
                self.experts.len(),
                spec.moe.num_experts
            ));
        }
        // validate() bounds 3 * h * i f32 values, so these cannot overflow.
        let proj_bytes = (h * i * self.expert_dtype.size()) as u64;
        let expert_bytes = 3 * proj_bytes;
        let want = spec
            .moe_layers()
            .flat_map(|l| (0..spec.moe.num_experts).map(move |e| (l, e)));
        let mut end = 0u64;
        for (n, (x, (layer, expert))) in self.experts.iter().zip(want).enumerate() {
            let at = format!(
                "experts[{n}] (layer {} expert {} at offset {})",
                x.layer, x.expert, x.offset
            );
            if (x.layer, x.expert) != (layer, expert) {
                return Err(format!(
                    "{at} is out of order: expected layer {layer} expert {expert}"
                ));
            }
            if x.offset % EXTENT_ALIGN != 0 {
                return Err(format!("{at}: the offset is not {EXTENT_ALIGN}-aligned"));
            }
            if x.offset < end {
                return Err(format!(
                    "{at} overlaps the previous extent, which ends at {end}"
                ));
            }
            if x.bytes != expert_bytes {
                return Err(format!(
                    "{at}: {} bytes, the spec's {:?} expert has {expert_bytes}",
                    x.bytes, self.expert_dtype
                ));
            }
            end = match x.offset.checked_add(x.bytes) {
                Some(e) if e <= self.experts_file_bytes => e,
                _ => {
                    return Err(format!(
                        "{at}: {} bytes reach past the end of experts.tiles ({} bytes)",
                        x.bytes, self.experts_file_bytes
                    ))
                }
            };
            self.check_projections(x, &at, [i, h], proj_bytes)?;
            if x.xxh3.len() != 16 || !x.xxh3.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{at}: xxh3 {:?} is not 16 hex digits", x.xxh3));
            }
        }
        Ok(())
    }

    /// Each projection of `x` has its spec shape and lies inside the extent, apart from the
    /// other two.
    fn check_projections(
        &self,
        x: &ExpertExtent,
        at: &str,
        [i, h]: [usize; 2],
        proj_bytes: u64,
    ) -> Result<(), String> {
        let mut ranges = Vec::with_capacity(3);
        for (p, shape) in [
            (Projection::Gate, [i, h]),
            (Projection::Up, [i, h]),
            (Projection::Down, [h, i]),
        ] {
            let pe = x.projection(p);
            let fits = pe
                .offset
                .checked_add(proj_bytes)
                .is_some_and(|e| e <= x.bytes);
            if pe.shape != shape || !fits {
                return Err(format!(
                    "{at}: {p:?} projection at offset {} with shape {:?} does not fit: the spec \
                     needs shape {shape:?} ({proj_bytes} bytes) inside the extent's {} bytes",
                    pe.offset, pe.shape, x.bytes
                ));
            }
            ranges.push((pe.offset, p));
        }
        ranges.sort_by_key(|r| r.0);
        for pair in ranges.windows(2) {
            if pair[0].0 + proj_bytes > pair[1].0 {
                return Err(format!(
                    "{at}: the {:?} and {:?} projections overlap",
                    pair[0].1, pair[1].1
                ));
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest of 2 layers x 2 f32 experts of hidden 8, intermediate 4 (384 bytes each).
    fn manifest() -> Manifest {
        let config = serde_json::json!({
            "model_type": "olmoe", "hidden_size": 8, "num_attention_heads": 2,
            "num_hidden_layers": 2, "vocab_size": 16, "max_position_embeddings": 32,
            "rms_norm_eps": 1e-5, "num_experts": 2, "num_experts_per_tok": 1,
            "intermediate_size": 4
        });
        let spec = ModelSpec::from_config_str(&config.to_string(), "config.json").unwrap();
        let proj = |k: u64, shape| ProjectionExtent {
            offset: k * 128,
            shape,
        };
        let experts = (0..4)
            .map(|n| ExpertExtent {
                layer: n / 2,
                expert: n % 2,
                offset: n as u64 * EXTENT_ALIGN,
                bytes: 384,
                xxh3: "0123456789abcdef".into(),
                gate: proj(0, [4, 8]),
                up: proj(1, [4, 8]),
                down: proj(2, [8, 4]),
            })
            .collect();
        Manifest {
            format_version: FORMAT_VERSION,
            name: "m".into(),
            spec,
            expert_dtype: Dtype::F32,
            experts_file_bytes: 4 * EXTENT_ALIGN,
            experts,
            source: "test".into(),
            source_files: Vec::new(),
            created_by: "test".into(),
        }
    }

    fn check_err(f: impl FnOnce(&mut Manifest)) -> String {
        let mut m = manifest();
        f(&mut m);
        m.check().unwrap_err()
    }

    #[test]
    fn a_well_formed_manifest_passes() {
        manifest().check().unwrap();
    }

    #[test]
    fn bad_extents_are_named() {
        let e = check_err(|m| m.experts[2].offset += 1);
        assert!(
            e.contains("experts[2] (layer 1 expert 0") && e.contains("aligned"),
            "{e}"
        );
        let e = check_err(|m| m.experts[3].offset = m.experts[2].offset);
        assert!(e.contains("experts[3]") && e.contains("overlaps"), "{e}");
        let e = check_err(|m| m.experts.swap(1, 2));
        assert!(
            e.contains("experts[1]") && e.contains("out of order"),
            "{e}"
        );
        let e = check_err(|m| m.experts[0].bytes = 380);
        assert!(e.contains("experts[0]") && e.contains("380 bytes"), "{e}");
        let e = check_err(|m| m.experts_file_bytes = 3 * EXTENT_ALIGN);
        assert!(
            e.contains("experts[3]") && e.contains("past the end"),
            "{e}"
        );
        let e = check_err(|m| m.experts[3].offset = u64::MAX - 4095);
        assert!(
            e.contains("experts[3]") && e.contains("past the end"),
            "{e}"
        );
        let e = check_err(|m| m.experts[1].up.offset = 64);
        assert!(e.contains("experts[1]") && e.contains("overlap"), "{e}");
        let e = check_err(|m| m.experts[1].down.offset = u64::MAX);
        assert!(e.contains("experts[1]") && e.contains("Down"), "{e}");
        let e = check_err(|m| m.experts[1].gate.shape = [8, 4]);
        assert!(e.contains("experts[1]") && e.contains("Gate"), "{e}");
        let e = check_err(|m| m.experts[0].xxh3 = "xyz".into());
        assert!(e.contains("experts[0]") && e.contains("xxh3"), "{e}");
        let e = check_err(|m| {
            m.experts.pop();
        });
        assert!(e.contains("3 expert extents listed"), "{e}");
    }

    #[test]
    fn a_bad_spec_is_caught_before_anything_is_sized_from_it() {
        let e = check_err(|m| m.spec.num_kv_heads = 0);
        assert!(e.starts_with("spec: `num_kv_heads`"), "{e}");
        // Would need 2^37 extents: refused without building a list of them.
        let e = check_err(|m| m.spec.moe.num_experts = 1 << 36);
        assert!(e.contains("expert extents listed"), "{e}");
        let e = check_err(|m| m.spec.moe.expert_intermediate = 1 << 50);
        assert!(e.contains("moe.expert_intermediate"), "{e}");
    }

    fn read_text(text: &str) -> Result<Manifest, ManifestError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MANIFEST_FILE);
        std::fs::write(&path, text).unwrap();
        Manifest::read(&path)
    }

    #[test]
    fn read_rejects_unknown_fields_and_other_versions() {
        let good = serde_json::to_value(manifest()).unwrap();
        read_text(&good.to_string()).unwrap();
        for (pointer, field) in [
            ("", "extra"),
            ("/experts/1", "checksum"),
            ("/experts/1/gate", "stride"),
            ("/spec", "rope_scaling"),
            ("/spec/rope", "factor"),
            ("/spec/layers/0", "dense"),
            ("/spec/layers/0/mlp", "intermediate"),
        ] {
            let mut v = good.clone();
            v.pointer_mut(pointer).unwrap()[field] = 1.into();
            let e = match read_text(&v.to_string()) {
                Ok(_) => panic!("{pointer}: unknown field {field} accepted"),
                Err(e) => e.to_string(),
            };
            assert!(
                e.contains(MANIFEST_FILE) && e.contains(&format!("unknown field `{field}`")),
                "{pointer}: {e}"
            );
        }
        // Another format version is reported as such, not as the fields it would add.
        let mut v = good.clone();
        v["format_version"] = 2.into();
        v["compression"] = "zstd".into();
        let e = read_text(&v.to_string()).unwrap_err().to_string();
        assert!(e.contains("format_version 2 is not 1"), "{e}");
        let mut v = good;
        v.as_object_mut().unwrap().remove("format_version");
        let e = read_text(&v.to_string()).unwrap_err().to_string();
        assert!(e.contains("format_version"), "{e}");
    }
}
