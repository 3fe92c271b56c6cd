//! Import of a Hugging Face checkpoint directory into a tile pack.
//!
//! Reads one or sharded safetensors, in the hub's per-expert layout or transformers 5's fused
//! 3-D expert tensors, in bf16, f16 or f32. Every tensor the spec implies must be present with
//! its shape; any other tensor is an error (a checkpoint we would silently misread is worse
//! than one we refuse).

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dtype::Dtype;
use crate::pack::manifest::{Projection, SourceDigest};
use crate::pack::names::{dense_tensors, expert_tensor, fused_expert_tensors, projection_shape};
use crate::pack::write::{PackError, PackSource};
use crate::safetensors_io::{Checkpoint, TensorInfo};
use crate::spec::ModelSpec;

/// Files copied from the checkpoint into the pack (those present); `tokenizer.json` is required.
pub const AUX_FILES: [&str; 5] = [
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
];

/// Where a layer's experts are in the checkpoint.
#[derive(Debug, Clone)]
enum ExpertLayout {
    /// One tensor per expert projection.
    PerExpert,
    /// `gate_up_proj` `[E, 2I, H]` and `down_proj` `[E, H, I]`.
    Fused {
        gate_up: TensorInfo,
        down: TensorInfo,
    },
}

/// A checkpoint directory checked against its config, ready to pack.
#[derive(Debug)]
pub struct CheckpointSource {
    dir: PathBuf,
    spec: ModelSpec,
    checkpoint: Checkpoint,
    expert_dtype: Dtype,
    layouts: HashMap<usize, ExpertLayout>,
}

impl CheckpointSource {
    /// Opens `dir`, parses its config.json and checks every tensor's presence, shape and type.
    pub fn open(dir: &Path) -> Result<CheckpointSource, PackError> {
        let spec = ModelSpec::from_config_file(&dir.join("config.json")).map_err(|e| {
            PackError::Other {
                what: format!("cannot import {}", dir.display()),
                source: Box::new(e),
            }
        })?;
        if !dir.join("tokenizer.json").is_file() {
            return Err(PackError::Source(format!(
                "{} has no tokenizer.json (TileFlow needs the fast tokenizer file)",
                dir.display()
            )));
        }
        let checkpoint = Checkpoint::open(dir)?;
        let mut seen = BTreeSet::new();
        let expect = |name: &str,
                      shape: &[usize],
                      seen: &mut BTreeSet<String>|
         -> Result<TensorInfo, PackError> {
            let info = checkpoint.get(name).ok_or_else(|| {
                PackError::Source(format!("{}: missing tensor {name}", dir.display()))
            })?;
            if info.shape != shape {
                return Err(PackError::Source(format!(
                    "{}: tensor {name} has shape {:?}, the config implies {shape:?}",
                    info.file.display(),
                    info.shape
                )));
            }
            seen.insert(name.to_string());
            Ok(info.clone())
        };
        for (name, shape) in dense_tensors(&spec) {
            expect(&name, &shape, &mut seen)?;
        }

        let mut layouts = HashMap::new();
        let mut expert_dtype: Option<(Dtype, String)> = None;
        let mut note_dtype = |info: &TensorInfo| -> Result<(), PackError> {
            match &expert_dtype {
                None => expert_dtype = Some((info.dtype, info.name.clone())),
                Some((d, first)) if *d != info.dtype => {
                    return Err(PackError::Source(format!(
                        "{}: expert tensor {} is {} but {first} is {d}; all routed experts must share one type",
                        info.file.display(),
                        info.name,
                        info.dtype
                    )))
                }
                Some(_) => {}
            }
            Ok(())
        };
        for layer in spec.moe_layers() {
            let first = expert_tensor(&spec, layer, 0, Projection::Gate);
            let [(gate_up, gate_up_shape), (down, down_shape)] = fused_expert_tensors(&spec, layer);
            let layout = if checkpoint.get(&first).is_some() || checkpoint.get(&gate_up).is_none() {
                for expert in 0..spec.moe.num_experts {
                    for proj in Projection::ALL {
                        let name = expert_tensor(&spec, layer, expert, proj);
                        let info = expect(&name, &projection_shape(&spec, proj), &mut seen)?;
                        note_dtype(&info)?;
                    }
                }
                ExpertLayout::PerExpert
            } else {
                let gate_up = expect(&gate_up, &gate_up_shape, &mut seen)?;
                let down = expect(&down, &down_shape, &mut seen)?;
                note_dtype(&gate_up)?;
                note_dtype(&down)?;
                ExpertLayout::Fused { gate_up, down }
            };
            layouts.insert(layer, layout);
        }
        for info in checkpoint.tensors() {
            if seen.contains(&info.name) || ignorable(&spec, &info.name) {
                continue;
            }
            return Err(PackError::Source(format!(
                "{}: unexpected tensor {} (shape {:?}) for a {} model with this config",
                info.file.display(),
                info.name,
                info.shape,
                spec.family.model_type()
            )));
        }
        let expert_dtype = expert_dtype.map(|(d, _)| d).unwrap_or(Dtype::BF16);
        Ok(CheckpointSource {
            dir: dir.to_path_buf(),
            spec,
            checkpoint,
            expert_dtype,
            layouts,
        })
    }
}

/// Tensors a checkpoint may carry that the model does not use.
fn ignorable(spec: &ModelSpec, name: &str) -> bool {
    name.ends_with(".rotary_emb.inv_freq") || (spec.tie_word_embeddings && name == "lm_head.weight")
}

impl PackSource for CheckpointSource {
    fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    fn expert_dtype(&self) -> Dtype {
        self.expert_dtype
    }

    fn dense_entries(&self) -> Vec<(String, Dtype, Vec<usize>)> {
        dense_tensors(&self.spec)
            .into_iter()
            .filter_map(|(name, shape)| {
                self.checkpoint
                    .get(&name)
                    .map(|info| (name, info.dtype, shape))
            })
            .collect()
    }

    fn read_dense(&self, name: &str) -> Result<Vec<u8>, PackError> {
        let info = self.checkpoint.get(name).ok_or_else(|| {
            PackError::Source(format!("{}: missing tensor {name}", self.dir.display()))
        })?;
        Ok(self.checkpoint.read_raw(info)?)
    }

    fn read_expert(
        &self,
        layer: usize,
        expert: usize,
        proj: Projection,
        out: &mut [u8],
    ) -> Result<(), PackError> {
        let layout = self
            .layouts
            .get(&layer)
            .ok_or_else(|| PackError::Source(format!("layer {layer} has no routed experts")))?;
        match layout {
            ExpertLayout::PerExpert => {
                let name = expert_tensor(&self.spec, layer, expert, proj);
                let info = self.checkpoint.get(&name).ok_or_else(|| {
                    PackError::Source(format!("{}: missing tensor {name}", self.dir.display()))
                })?;
                self.checkpoint.read_raw_into(info, out)?;
            }
            ExpertLayout::Fused { gate_up, down } => {
                let n = out.len() as u64;
                let (info, at) = match proj {
                    Projection::Gate => (gate_up, (2 * expert as u64) * n),
                    Projection::Up => (gate_up, (2 * expert as u64 + 1) * n),
                    Projection::Down => (down, expert as u64 * n),
                };
                self.checkpoint.read_range(info, at, out)?;
            }
        }
        Ok(())
    }

    fn write_aux_files(&self, dir: &Path) -> Result<(), PackError> {
        for name in AUX_FILES {
            let from = self.dir.join(name);
            if from.is_file() {
                std::fs::copy(&from, dir.join(name)).map_err(|source| PackError::Write {
                    path: dir.join(name).display().to_string(),
                    source,
                })?;
            }
        }
        Ok(())
    }

    fn describe(&self) -> (String, Vec<SourceDigest>) {
        let digests = self
            .checkpoint
            .files()
            .iter()
            .map(|path| {
                let (bytes, header) = header_digest(path).unwrap_or((0, String::new()));
                SourceDigest {
                    file: path
                        .strip_prefix(&self.dir)
                        .unwrap_or(path)
                        .display()
                        .to_string(),
                    bytes,
                    header_xxh3: header,
                }
            })
            .collect();
        (self.dir.display().to_string(), digests)
    }
}

/// File size and xxh3-64 of a safetensors file's header.
fn header_digest(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let bytes = f.metadata()?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len).min(bytes.saturating_sub(8));
    let mut header = vec![0u8; usize::try_from(n).unwrap_or(0)];
    f.read_exact(&mut header)?;
    Ok((bytes, crate::pack::manifest::xxh3_hex(&header)))
}
