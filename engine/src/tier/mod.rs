//! The expert tiers: routed experts read from `experts.tiles` through a [`ReadQueue`] into a
//! host tier (page-locked slots) and a device tier (slots in the backend's memory).
//!
//! An expert moves storage → host slot (the storage backend's DMA) → device slot (the backend's
//! asynchronous copy, see [`TierMemory`]), in tiles of `tile_size` bytes: all tiles of an expert
//! are submitted together and each is copied to its device slot as it lands, so copying tile k
//! overlaps reading tile k+1. With no host tier, reads land in a small staging ring of tile
//! buffers that are given back as soon as their tile is copied and hashed.
//!
//! Checksums are verified (streaming xxh3 in tile order) when an expert first enters from
//! storage ([`Verify::First`]) or on every fill ([`Verify::Always`]); an expert becomes resident
//! only once every tile is copied and its digest matches. A failed read or a mismatch fails only
//! the requests that needed that expert. Prefetches ([`crate::forward::ExpertProvider::prefetch`])
//! are queued and started by a token bucket so that demand reads go first.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tileflow_spdk::{DmaArena, DmaBuf, ReadQueue, StorageError, DMA_ALIGN};

use crate::backend::cpu::CpuTierMemory;
use crate::backend::ExpertBytes;
use crate::dtype::Dtype;
use crate::pack::manifest::{ExpertExtent, Manifest};

mod config;
mod fill;
mod memory;
mod pacing;
mod policy;
mod schedule;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_prefetch;

pub use config::{
    CpuExperts, EvictionPolicy, Lookups, PrefetchCounts, RunCounts, TierConfig, TierStats,
};
pub use memory::{TierMemory, TierMemoryError};

use fill::Fill;
use pacing::PrefetchPacer;
use policy::{SlotMeta, Usage};

/// When expert checksums are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// The first time each expert is read from storage.
    First,
    /// Every time an expert is copied into a slot.
    Always,
    /// Never (benchmarks of the raw path only).
    Never,
}

/// Why an expert could not be provided, or the tiers could not be set up.
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
        /// Byte offset of the expert in experts.tiles.
        offset: u64,
        /// The storage error (naming the file, the tile's offset and length).
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
    /// The tier configuration does not fit this model.
    #[error("model {model}: {reason}")]
    Config {
        /// Model name.
        model: String,
        /// What does not fit.
        reason: String,
    },
    /// experts.tiles could not be opened for reading.
    #[error("model {model}: cannot open {path} for tile reads")]
    Open {
        /// Model name.
        model: String,
        /// experts.tiles.
        path: String,
        /// Why.
        #[source]
        source: StorageError,
    },
    /// The backend could not provide tier memory or copy an expert into its device slot.
    #[error("model {model}: {what}")]
    Memory {
        /// Model name.
        model: String,
        /// What was being done (naming the layer and expert for copies).
        what: String,
        /// Why.
        #[source]
        source: TierMemoryError,
    },
    /// No device slot could be freed for an expert (every slot pinned, in use by this step or
    /// being filled with nothing left in flight).
    #[error("model {model}: no device slot is free for layer {layer} expert {expert}")]
    NoSlot {
        /// Model name.
        model: String,
        /// Layer.
        layer: usize,
        /// Expert.
        expert: usize,
    },
}

/// A resident expert: its raw bytes and where each projection lies in them.
#[derive(Debug, Clone, Copy)]
pub struct ExpertView<'a> {
    /// The extent's bytes (gate, up, down).
    pub bytes: ExpertBytes<'a>,
    /// Element type.
    pub dtype: Dtype,
    /// Its manifest entry.
    pub extent: &'a ExpertExtent,
}

/// One device-tier slot.
#[derive(Debug)]
struct DeviceSlot<S> {
    meta: SlotMeta,
    mem: S,
}

/// One host-tier slot: its memory split once into tile buffers (`None` while a tile read into
/// it is in flight).
#[derive(Debug)]
struct HostSlot {
    meta: SlotMeta,
    tiles: Vec<Option<DmaBuf>>,
}

/// Routed experts of one model in a device tier and a host tier, read from storage through a
/// [`ReadQueue`].
#[derive(Debug)]
pub struct ExpertCache<M: TierMemory = CpuTierMemory> {
    model: String,
    manifest: Arc<Manifest>,
    path: PathBuf,
    verify: Verify,
    tile_size: usize,
    slot_bytes: usize,
    memory: M,
    queue: ReadQueue,
    /// Device slots allocated so far (lazily, up to `device_cap`).
    device: Vec<DeviceSlot<M::DeviceSlot>>,
    device_cap: usize,
    device_index: HashMap<usize, usize>,
    host: Vec<HostSlot>,
    host_index: HashMap<usize, usize>,
    /// Free staging-ring buffers (no host tier only).
    ring: Vec<DmaBuf>,
    usage: Usage,
    verified: Vec<bool>,
    /// Fills in flight, by id (ids grow, so demand order is start order).
    fills: BTreeMap<u64, Fill<M::Event>>,
    /// The fill of each expert being fetched.
    filling: HashMap<usize, u64>,
    next_fill: u64,
    demand_queue: VecDeque<usize>,
    prefetch_queue: VecDeque<usize>,
    pacer: PrefetchPacer,
    /// Experts of the latest prepare call: never evicted until the next one.
    protected: HashSet<usize>,
    /// Experts the latest call gave to the CPU: their host slots are kept until the next.
    host_protected: HashSet<usize>,
    /// Demand fills that failed, waiting for their prepare call to report them.
    failed: HashMap<usize, TierError>,
    pinned: usize,
    stats: TierStats,
    stalls: Vec<Duration>,
}

/// Stall events kept for [`ExpertCache::drain_stalls`] when nobody drains them.
const MAX_STALL_EVENTS: usize = 1 << 16;

impl<M: TierMemory> ExpertCache<M> {
    /// Opens the tiers of `manifest`'s experts over `experts_path` (its experts.tiles), with
    /// memory from `memory`, and reads the pinned experts.
    pub fn open(
        manifest: Arc<Manifest>,
        experts_path: &Path,
        config: &TierConfig,
        memory: M,
    ) -> Result<ExpertCache<M>, TierError> {
        let model = manifest.name.clone();
        let config_err = |reason: String| TierError::Config {
            model: model.clone(),
            reason,
        };
        if config.tile_size == 0 || !config.tile_size.is_multiple_of(DMA_ALIGN) {
            return Err(config_err(format!(
                "tile size {} is not a positive multiple of {DMA_ALIGN}",
                config.tile_size
            )));
        }
        let largest = manifest.experts.iter().map(|e| e.bytes).max().unwrap_or(0);
        let slot_bytes = usize::try_from(largest.div_ceil(DMA_ALIGN as u64).max(1))
            .ok()
            .and_then(|blocks| blocks.checked_mul(DMA_ALIGN))
            .ok_or_else(|| config_err(format!("an expert of {largest} bytes is too large")))?;
        let n = manifest.experts.len();
        let slot64 = slot_bytes as u64;
        let device_cap = match (config.device_slots, config.device_bytes) {
            (Some(s), _) => s,
            (None, Some(b)) => usize::try_from(b / slot64).unwrap_or(usize::MAX),
            (None, None) => n,
        }
        .clamp(1, n.max(1));
        let host_slots = usize::try_from(config.host_bytes / slot64)
            .unwrap_or(usize::MAX)
            .min(n);
        let mem_err = |what: String| {
            let model = model.clone();
            move |source| TierError::Memory {
                model,
                what,
                source,
            }
        };
        let mut arenas = Vec::new();
        let mut host = Vec::new();
        let mut ring = Vec::new();
        if host_slots > 0 {
            let total = slot_bytes
                .checked_mul(host_slots)
                .ok_or(TierError::Alloc { bytes: usize::MAX })?;
            let mem = memory
                .alloc_host(total)
                .map_err(mem_err(format!("host tier of {host_slots} slots")))?;
            let (arena, bufs) = DmaArena::new(mem, slot_bytes, host_slots)
                .map_err(|e| config_err(format!("host tier layout: {e}")))?;
            arenas.push(arena);
            for buf in bufs {
                host.push(HostSlot {
                    meta: SlotMeta::default(),
                    tiles: split_tiles(buf, config.tile_size),
                });
            }
        } else {
            let piece = config.tile_size.min(slot_bytes);
            let count = (config.io.queue_depth as usize).max(2);
            let total = piece
                .checked_mul(count)
                .ok_or(TierError::Alloc { bytes: usize::MAX })?;
            let mem = memory
                .alloc_host(total)
                .map_err(mem_err(format!("staging ring of {count} tiles")))?;
            let (arena, bufs) = DmaArena::new(mem, piece, count)
                .map_err(|e| config_err(format!("staging ring layout: {e}")))?;
            arenas.push(arena);
            ring = bufs;
        }
        let queue = ReadQueue::open(&config.io, &[experts_path], &arenas).map_err(|source| {
            TierError::Open {
                model: model.clone(),
                path: experts_path.display().to_string(),
                source,
            }
        })?;
        let now = Instant::now();
        let mut cache = ExpertCache {
            model,
            path: experts_path.to_path_buf(),
            verify: config.verify,
            tile_size: config.tile_size,
            slot_bytes,
            memory,
            device: Vec::new(),
            device_cap,
            device_index: HashMap::new(),
            host,
            host_index: HashMap::new(),
            ring,
            usage: Usage::new(config.policy, n, 8 * device_cap as u64),
            verified: vec![false; n],
            fills: BTreeMap::new(),
            filling: HashMap::new(),
            next_fill: 0,
            demand_queue: VecDeque::new(),
            prefetch_queue: VecDeque::new(),
            pacer: PrefetchPacer::new(config.prefetch_rate_bytes, config.prefetch_burst_bytes, now),
            protected: HashSet::new(),
            host_protected: HashSet::new(),
            failed: HashMap::new(),
            pinned: 0,
            stats: TierStats {
                source: queue.backend().as_str(),
                ..TierStats::default()
            },
            stalls: Vec::new(),
            queue,
            manifest,
        };
        cache.pin(&config.pinned)?;
        Ok(cache)
    }

    /// Reads the pinned experts into device slots that are never evicted.
    fn pin(&mut self, pinned: &[(usize, usize)]) -> Result<(), TierError> {
        let mut set = Vec::new();
        for &(layer, expert) in pinned {
            let pos = self.position(layer, expert)?;
            if !set.contains(&pos) {
                set.push(pos);
            }
        }
        let all = self.manifest.experts.len();
        if set.len() > self.device_cap || (set.len() == self.device_cap && all > set.len()) {
            return Err(TierError::Config {
                model: self.model.clone(),
                reason: format!(
                    "{} pinned experts do not fit {} device slots and leave one for the others",
                    set.len(),
                    self.device_cap
                ),
            });
        }
        for chunk in set.chunks(self.device_cap.max(1)) {
            self.fetch_all(chunk).map_err(|(_, e)| *e)?;
            for &pos in chunk {
                if let Some(&slot) = self.device_index.get(&pos) {
                    self.device[slot].meta.pinned = true;
                    self.pinned += 1;
                }
            }
        }
        self.protected.clear();
        Ok(())
    }

    /// Index of (layer, expert) in the manifest's list.
    fn position(&self, layer: usize, expert: usize) -> Result<usize, TierError> {
        self.manifest
            .experts
            .binary_search_by(|x| (x.layer, x.expert).cmp(&(layer, expert)))
            .map_err(|_| TierError::NoSuchExpert {
                model: self.model.clone(),
                layer,
                expert,
            })
    }

    /// Experts that can be prepared at once: device slots not pinned.
    pub fn capacity(&self) -> usize {
        (self.device_cap - self.pinned.min(self.device_cap)).max(1)
    }

    /// Bytes of one slot (the largest expert, rounded up to 4096).
    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    /// The storage backend reading this model's experts.
    pub fn backend(&self) -> tileflow_spdk::IoBackend {
        self.queue.backend()
    }

    /// Whether experts.tiles is read with `O_DIRECT` (false where the filesystem refused it).
    pub fn direct(&self) -> bool {
        self.queue.direct()
    }

    /// Slots of the host tier (0: reads go through the staging ring).
    pub fn host_slots(&self) -> usize {
        self.host.len()
    }

    /// Counters so far, with the resident gauges of now.
    pub fn stats(&self) -> TierStats {
        let mut s = self.stats.clone();
        s.device_resident_bytes = self.resident_bytes();
        s.device_resident_experts = self.device_index.len();
        s.host_resident_bytes = (self.host.len() * self.slot_bytes) as u64;
        s.host_resident_experts = self.host_index.len();
        s
    }

    /// Per-prepare stall events since the last call (for a histogram).
    pub fn drain_stalls(&mut self) -> Vec<Duration> {
        std::mem::take(&mut self.stalls)
    }

    /// Bytes of the device-tier slots allocated so far.
    pub fn resident_bytes(&self) -> u64 {
        self.device
            .iter()
            .map(|s| self.memory.device_slot_len(&s.mem) as u64)
            .sum()
    }

    /// Whether (layer, expert) is resident in the device tier.
    pub fn is_resident(&self, layer: usize, expert: usize) -> bool {
        self.position(layer, expert)
            .is_ok_and(|pos| self.device_index.contains_key(&pos))
    }

    /// Whether (layer, expert) is resident in the host tier.
    pub fn is_host_resident(&self, layer: usize, expert: usize) -> bool {
        self.position(layer, expert)
            .is_ok_and(|pos| self.host_index.contains_key(&pos))
    }

    /// Every expert resident in the host tier, by manifest order, with its host-slot bytes
    /// (benchmarks of the CPU kernels and of the memory under them).
    pub fn host_views(&self) -> Vec<ExpertView<'_>> {
        let mut positions: Vec<usize> = self.host_index.keys().copied().collect();
        positions.sort_unstable();
        positions
            .into_iter()
            .filter_map(|pos| self.host_view(pos))
            .collect()
    }

    /// The host-slot bytes of manifest position `pos`, when it is in the host tier and no
    /// read into its slot is in flight (the slot's tiles seen as one slice).
    fn host_view(&self, pos: usize) -> Option<ExpertView<'_>> {
        let extent = self.manifest.experts.get(pos)?;
        let slot = self.host.get(*self.host_index.get(&pos)?)?;
        let tiles: Option<Vec<&DmaBuf>> = slot.tiles.iter().map(Option::as_ref).collect();
        let bytes = DmaBuf::span(&tiles?)?.get(..usize::try_from(extent.bytes).ok()?)?;
        Some(ExpertView {
            bytes: ExpertBytes::Host(bytes),
            dtype: self.manifest.expert_dtype,
            extent,
        })
    }

    /// The bytes of (layer, expert) if it is resident in the device tier, without touching
    /// recency.
    pub fn peek(&self, layer: usize, expert: usize) -> Option<ExpertView<'_>> {
        let pos = self.position(layer, expert).ok()?;
        let slot = self.device.get(*self.device_index.get(&pos)?)?;
        let extent = self.manifest.experts.get(pos)?;
        let bytes = self
            .memory
            .device_bytes(&slot.mem, usize::try_from(extent.bytes).ok()?)?;
        Some(ExpertView {
            bytes,
            dtype: self.manifest.expert_dtype,
            extent,
        })
    }
}

/// Splits a host slot into tile buffers of `tile_size` bytes (the last one takes the rest).
fn split_tiles(buf: DmaBuf, tile_size: usize) -> Vec<Option<DmaBuf>> {
    let mut tiles = Vec::new();
    let mut rest = buf;
    loop {
        match rest.split_at(tile_size) {
            Ok((head, tail)) => {
                tiles.push(Some(head));
                rest = tail;
            }
            Err(last) => {
                tiles.push(Some(last));
                return tiles;
            }
        }
    }
}
