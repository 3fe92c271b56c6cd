//! Opening a tile pack from the store as a runnable model, on the CPU backend or on any other
//! [`Backend`] with its [`TierMemory`].

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tileflow_spdk::{FileSource, TileSource};

use crate::backend::cpu::{CpuBackend, CpuTierMemory};
use crate::backend::{Backend, BackendError};
use crate::forward::{EngineError, KvCacheConfig, ModelRunner};
use crate::pack::manifest::{Manifest, DENSE_FILE, EXPERTS_FILE};
use crate::safetensors_io::{Checkpoint, SafetensorsError};
use crate::store::{Store, StoreError};
use crate::tier::{ExpertCache, TierConfig, TierError, TierMemory};
use crate::weights::{DenseWeights, TensorLoader, WeightsError};

/// Why a model could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The store could not give the pack.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// dense.safetensors could not be read.
    #[error("model {model}: cannot read {path}")]
    Dense {
        /// Model name.
        model: String,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: Box<SafetensorsError>,
    },
    /// A dense tensor is missing from dense.safetensors, has another shape, or is unreadable.
    #[error("model {model}: {path} does not hold the dense weights the spec needs")]
    DenseWeights {
        /// Model name.
        model: String,
        /// The file.
        path: String,
        /// Which tensor, and why.
        #[source]
        source: Box<WeightsError>,
    },
    /// dense.safetensors holds a tensor the spec does not use: the manifest's spec and the
    /// weights beside it disagree (a layer count, a family, a tie edited in one of them).
    #[error(
        "model {model}: {path} holds tensor {tensor}, which the manifest's spec does not use; \
         the spec and the weights disagree"
    )]
    DenseUnused {
        /// Model name.
        model: String,
        /// The file.
        path: String,
        /// The first such tensor.
        tensor: String,
    },
    /// experts.tiles could not be opened.
    #[error("model {model}: cannot open {path}")]
    Experts {
        /// Model name.
        model: String,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: tileflow_spdk::StorageError,
    },
    /// experts.tiles is shorter than the manifest says.
    #[error("model {model}: {path} has {actual} bytes but the manifest needs {expected}")]
    ShortExperts {
        /// Model name.
        model: String,
        /// The file.
        path: String,
        /// Bytes the manifest needs.
        expected: u64,
        /// Bytes on disk.
        actual: u64,
    },
    /// The expert tiers could not be set up (config, memory, or a pinned expert unreadable).
    #[error("model {model}: cannot set up the expert tiers")]
    Tier {
        /// Model name.
        model: String,
        /// Why.
        #[source]
        source: Box<TierError>,
    },
    /// The compute backend could not be set up for the model.
    #[error("model {model}: cannot set up the {backend} backend")]
    Backend {
        /// Model name.
        model: String,
        /// The backend asked for.
        backend: String,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// The engine refused the weights.
    #[error("model {model}: cannot build the engine")]
    Engine {
        /// Model name.
        model: String,
        /// Why.
        #[source]
        source: EngineError,
    },
}

/// How to open a model.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Expert tier sizes, policy, storage backend and prefetch pacing.
    pub tier: TierConfig,
    /// KV cache size.
    pub kv: KvCacheConfig,
    /// CPU threads (default: rayon's).
    pub threads: Option<usize>,
}

/// A model opened from the store, on backend `B` with expert tiers in `M`'s memory.
#[derive(Debug)]
pub struct LoadedModel<B: Backend = CpuBackend, M: TierMemory = CpuTierMemory> {
    /// Its name.
    pub name: String,
    /// Its pack directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Arc<Manifest>,
    /// The engine over it.
    pub runner: ModelRunner<B, ExpertCache<M>>,
}

/// Reads dense tensors from a pack's dense.safetensors as f32, remembering which it was asked
/// for.
#[derive(Debug)]
pub struct DenseLoader {
    checkpoint: Checkpoint,
    asked: HashSet<String>,
}

/// Why a dense tensor could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DenseLoadError {
    /// Not in the file.
    #[error("{file}: no tensor {name}")]
    Missing {
        /// The file.
        file: String,
        /// The tensor.
        name: String,
    },
    /// Not the shape the spec implies.
    #[error("{file}: tensor {name} has shape {actual:?}, expected {expected:?}")]
    Shape {
        /// The file.
        file: String,
        /// The tensor.
        name: String,
        /// Its shape.
        actual: Vec<usize>,
        /// The spec's shape.
        expected: Vec<usize>,
    },
    /// Reading failed.
    #[error(transparent)]
    Read(#[from] SafetensorsError),
}

impl DenseLoader {
    /// Opens a safetensors file.
    pub fn open(path: &Path) -> Result<DenseLoader, SafetensorsError> {
        Ok(DenseLoader {
            checkpoint: Checkpoint::open(path)?,
            asked: HashSet::new(),
        })
    }

    /// Tensors of the file never asked for, by name.
    pub fn unused(&self) -> impl Iterator<Item = &str> + '_ {
        let mut names: Vec<&str> = self
            .checkpoint
            .tensors()
            .map(|t| t.name.as_str())
            .filter(|n| !self.asked.contains(*n))
            .collect();
        names.sort_unstable();
        names.into_iter()
    }
}

impl TensorLoader for DenseLoader {
    type Error = DenseLoadError;

    fn has(&self, name: &str) -> bool {
        self.checkpoint.get(name).is_some()
    }

    fn load_f32(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>, DenseLoadError> {
        self.asked.insert(name.to_string());
        let file = || {
            self.checkpoint
                .files()
                .first()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        let info = self
            .checkpoint
            .get(name)
            .ok_or_else(|| DenseLoadError::Missing {
                file: file(),
                name: name.to_string(),
            })?;
        if info.shape != shape {
            return Err(DenseLoadError::Shape {
                file: file(),
                name: name.to_string(),
                actual: info.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(self.checkpoint.read_f32(info)?)
    }
}

impl LoadedModel {
    /// Opens `name` from `store` on the CPU backend.
    pub fn open(
        store: &Store,
        name: &str,
        options: &LoadOptions,
    ) -> Result<LoadedModel, LoadError> {
        let threads = options.threads;
        LoadedModel::open_on(store, name, options, "cpu", |_| {
            let backend = match threads {
                Some(n) => CpuBackend::with_threads(n),
                None => CpuBackend::new(),
            };
            Ok((backend, CpuTierMemory))
        })
    }
}

impl<B: Backend, M: TierMemory> LoadedModel<B, M> {
    /// Opens `name` from `store` on the backend and tier memory that `make` builds for the
    /// pack's manifest (`backend` names it in errors).
    pub fn open_on(
        store: &Store,
        name: &str,
        options: &LoadOptions,
        backend: &str,
        make: impl FnOnce(&Manifest) -> Result<(B, M), BackendError>,
    ) -> Result<LoadedModel<B, M>, LoadError> {
        let stored = store.get(name)?;
        let manifest = Arc::new(stored.manifest);
        let dense_path = stored.dir.join(DENSE_FILE);
        let mut dense = DenseLoader::open(&dense_path).map_err(|source| LoadError::Dense {
            model: name.to_string(),
            path: dense_path.display().to_string(),
            source: Box::new(source),
        })?;
        let experts_path = stored.dir.join(EXPERTS_FILE);
        let source = FileSource::open(&experts_path).map_err(|source| LoadError::Experts {
            model: name.to_string(),
            path: experts_path.display().to_string(),
            source,
        })?;
        if source.len() < manifest.experts_file_bytes {
            return Err(LoadError::ShortExperts {
                model: name.to_string(),
                path: experts_path.display().to_string(),
                expected: manifest.experts_file_bytes,
                actual: source.len(),
            });
        }
        drop(source);
        let (backend, memory) = make(&manifest).map_err(|source| LoadError::Backend {
            model: name.to_string(),
            backend: backend.to_string(),
            source,
        })?;
        let cache = ExpertCache::open(manifest.clone(), &experts_path, &options.tier, memory)
            .map_err(|source| LoadError::Tier {
                model: name.to_string(),
                source: Box::new(source),
            })?;
        let weights = DenseWeights::load(&manifest.spec, &mut dense).map_err(|source| {
            LoadError::DenseWeights {
                model: name.to_string(),
                path: dense_path.display().to_string(),
                source: Box::new(source),
            }
        })?;
        if let Some(tensor) = dense.unused().next() {
            return Err(LoadError::DenseUnused {
                model: name.to_string(),
                path: dense_path.display().to_string(),
                tensor: tensor.to_string(),
            });
        }
        let runner = ModelRunner::new(manifest.spec.clone(), backend, weights, cache, options.kv)
            .map_err(|source| LoadError::Engine {
                model: name.to_string(),
                source,
            })?
            .with_prefetch_depth(options.tier.prefetch_depth)
            .with_cpu_experts(options.tier.cpu_experts);
        Ok(LoadedModel {
            name: name.to_string(),
            dir: stored.dir,
            manifest,
            runner,
        })
    }
}
