//! The tier cache: routed experts read from `experts.tiles` through a [`TileSource`] into a
//! fixed budget of slots, evicted least-recently-used.
//!
//! Each slot is a 4 KiB-aligned buffer (the form the O_DIRECT, SPDK and CUDA paths need), and
//! an expert's checksum is verified when it first enters the cache (or on every fill).

use std::collections::HashMap;
use std::sync::Arc;

use tileflow_spdk::{AlignedBuf, StorageError, TileSource};

use crate::dtype::Dtype;
use crate::pack::manifest::{xxh3_hex, ExpertExtent, Manifest};

mod config;

pub use config::{EvictionPolicy, Lookups, PrefetchCounts, TierConfig, TierStats};

/// When expert checksums are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// The first time each expert is read.
    First,
    /// Every time an expert is read into a slot.
    Always,
    /// Never (benchmarks of the raw path only).
    Never,
}

/// Why an expert could not be provided.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// The pack has no such expert.
    #[error("model {model}: layer {layer} has no expert {expert}")]
    NoSuchExpert {
        /// Model name.
        model: String,
        /// Layer.
        layer: usize,
        /// Expert.
        expert: usize,
    },
    /// Reading the extent failed.
    #[error("model {model}: cannot read layer {layer} expert {expert} at offset {offset}")]
    Read {
        /// Model name.
        model: String,
        /// Layer.
        layer: usize,
        /// Expert.
        expert: usize,
        /// Byte offset in experts.tiles.
        offset: u64,
        /// The storage error.
        #[source]
        source: StorageError,
    },
    /// The bytes read do not match the manifest's checksum.
    #[error(
        "model {model}: checksum mismatch for layer {layer} expert {expert} at offset {offset} of {path}: \
         manifest says {expected}, read {actual}"
    )]
    Checksum {
        /// Model name.
        model: String,
        /// Layer.
        layer: usize,
        /// Expert.
        expert: usize,
        /// Byte offset in experts.tiles.
        offset: u64,
        /// experts.tiles.
        path: String,
        /// xxh3 in the manifest.
        expected: String,
        /// xxh3 of the bytes read.
        actual: String,
    },
    /// A slot buffer could not be allocated.
    #[error("cannot allocate a {bytes}-byte expert slot")]
    Alloc {
        /// Its size.
        bytes: usize,
    },
}

#[derive(Debug)]
struct Slot {
    key: (usize, usize),
    buf: AlignedBuf,
    last_used: u64,
}

/// A resident expert: its raw bytes and where each projection lies in them.
#[derive(Debug, Clone, Copy)]
pub struct ExpertView<'a> {
    /// The extent's bytes (gate, up, down).
    pub bytes: &'a [u8],
    /// Element type.
    pub dtype: Dtype,
    /// Its manifest entry.
    pub extent: &'a ExpertExtent,
}

/// Routed experts of one model in a fixed number of slots.
#[derive(Debug)]
pub struct ExpertCache {
    model: String,
    manifest: Arc<Manifest>,
    source: Box<dyn TileSource>,
    verify: Verify,
    capacity: usize,
    slots: Vec<Slot>,
    index: HashMap<(usize, usize), usize>,
    verified: Vec<bool>,
    clock: u64,
    stats: TierStats,
}

impl ExpertCache {
    /// A cache of `capacity` slots (at least one) over `source` (the pack's experts.tiles).
    pub fn new(
        manifest: Arc<Manifest>,
        source: Box<dyn TileSource>,
        capacity: usize,
        verify: Verify,
    ) -> ExpertCache {
        let n = manifest.experts.len();
        ExpertCache {
            model: manifest.name.clone(),
            manifest,
            source,
            verify,
            capacity: capacity.max(1),
            slots: Vec::new(),
            index: HashMap::new(),
            verified: vec![false; n],
            clock: 0,
            stats: TierStats {
                source: "pread",
                ..TierStats::default()
            },
        }
    }

    /// Slots in the budget.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Counters so far.
    pub fn stats(&self) -> TierStats {
        let mut s = self.stats.clone();
        s.device_resident_bytes = self.resident_bytes();
        s.device_resident_experts = self.index.len();
        s
    }

    /// Makes (layer, expert) resident, reading it if needed, and returns its bytes.
    pub fn get(&mut self, layer: usize, expert: usize) -> Result<ExpertView<'_>, TierError> {
        self.clock += 1;
        let key = (layer, expert);
        let slot = match self.index.get(&key) {
            Some(&slot) => {
                self.stats.device.hits += 1;
                slot
            }
            None => {
                self.stats.device.misses += 1;
                self.fill(key)?
            }
        };
        self.slots[slot].last_used = self.clock;
        let extent = self
            .manifest
            .extent(layer, expert)
            .ok_or_else(|| self.no_such(key))?;
        let bytes = &self.slots[slot].buf[..extent.bytes as usize];
        Ok(ExpertView {
            bytes,
            dtype: self.manifest.expert_dtype,
            extent,
        })
    }

    fn no_such(&self, (layer, expert): (usize, usize)) -> TierError {
        TierError::NoSuchExpert {
            model: self.model.clone(),
            layer,
            expert,
        }
    }

    /// Reads `key` into a free or the least recently used slot.
    fn fill(&mut self, key: (usize, usize)) -> Result<usize, TierError> {
        let pos = self
            .manifest
            .experts
            .binary_search_by(|x| (x.layer, x.expert).cmp(&key))
            .map_err(|_| self.no_such(key))?;
        let extent = &self.manifest.experts[pos];
        let len = extent.bytes as usize;
        let slot = if self.slots.len() < self.capacity {
            let buf = AlignedBuf::new(len).map_err(|_| TierError::Alloc { bytes: len })?;
            self.slots.push(Slot {
                key,
                buf,
                last_used: 0,
            });
            self.slots.len() - 1
        } else {
            let victim = (0..self.slots.len())
                .min_by_key(|&i| self.slots[i].last_used)
                .unwrap_or(0);
            self.index.remove(&self.slots[victim].key);
            self.stats.device_evictions += 1;
            if self.slots[victim].buf.len() < len {
                self.slots[victim].buf =
                    AlignedBuf::new(len).map_err(|_| TierError::Alloc { bytes: len })?;
            }
            victim
        };
        let buf = &mut self.slots[slot].buf[..len];
        let read = self
            .source
            .read_at(extent.offset, buf)
            .map_err(|source| TierError::Read {
                model: self.model.clone(),
                layer: key.0,
                expert: key.1,
                offset: extent.offset,
                source,
            });
        if let Err(e) = read {
            self.slots.swap_remove(slot);
            self.rebuild_index();
            return Err(e);
        }
        self.stats.bytes_read += len as u64;
        let check = match self.verify {
            Verify::Always => true,
            Verify::First => !self.verified[pos],
            Verify::Never => false,
        };
        if check {
            let actual = xxh3_hex(buf);
            if actual != extent.xxh3 {
                let err = TierError::Checksum {
                    model: self.model.clone(),
                    layer: key.0,
                    expert: key.1,
                    offset: extent.offset,
                    path: self.source.path().display().to_string(),
                    expected: extent.xxh3.clone(),
                    actual,
                };
                self.slots.swap_remove(slot);
                self.rebuild_index();
                return Err(err);
            }
            self.verified[pos] = true;
        }
        self.slots[slot].key = key;
        self.index.insert(key, slot);
        Ok(slot)
    }

    fn rebuild_index(&mut self) {
        self.index = self
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.key, i))
            .collect();
    }
}

impl ExpertCache {
    /// The bytes of (layer, expert) if it is resident, without touching recency.
    pub fn peek(&self, layer: usize, expert: usize) -> Option<ExpertView<'_>> {
        let slot = *self.index.get(&(layer, expert))?;
        let extent = self.manifest.extent(layer, expert)?;
        let bytes = &self.slots[slot].buf[..extent.bytes as usize];
        Some(ExpertView {
            bytes,
            dtype: self.manifest.expert_dtype,
            extent,
        })
    }
}

impl crate::forward::ExpertProvider for ExpertCache {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn prepare(
        &mut self,
        layer: usize,
        experts: &[usize],
    ) -> Result<(), crate::forward::EngineError> {
        for &expert in experts {
            self.get(layer, expert)
                .map_err(|e| crate::forward::EngineError::ExpertRead {
                    layer,
                    expert,
                    source: Box::new(e),
                })?;
        }
        Ok(())
    }

    fn expert(
        &self,
        layer: usize,
        expert: usize,
    ) -> Result<crate::backend::ExpertRef<'_>, crate::forward::EngineError> {
        let view = self.peek(layer, expert).ok_or_else(|| {
            crate::forward::EngineError::ExpertUnavailable {
                layer,
                expert,
                reason: "it was not prepared (or was evicted) before use".into(),
            }
        })?;
        Ok(crate::backend::ExpertRef {
            bytes: view.bytes,
            dtype: view.dtype,
            gate: view.extent.gate,
            up: view.extent.up,
            down: view.extent.down,
        })
    }
}

impl ExpertCache {
    /// Bytes of the slot buffers allocated so far.
    pub fn resident_bytes(&self) -> u64 {
        self.slots.iter().map(|s| s.buf.len() as u64).sum()
    }
}
