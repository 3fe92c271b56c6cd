//! What the engine thread reports about a loaded model: its `/api/status` row and its
//! `/api/cache` entry, built from the tier's counters ([`TierStats`]) and the tier
//! configuration the model was opened with ([`TierConfig`]).
//!
//! Some facts are not yet exposed by the expert cache itself; where so, the value comes from
//! the configuration or the manifest, and the function that computes it says which (see
//! [`ExpertLayout`] and [`storage`]).

use std::time::Duration;

use tileflow_client::native::{ModelCache, ModelStatus, PrefetchCache, StorageCache, TierCache};
use tileflow_engine::pack::manifest::Manifest;
use tileflow_engine::tier::{Lookups, TierConfig, TierStats};
use tileflow_spdk::BackendChoice;

use super::CpuScheduler;

/// One loaded model, as `/api/status` and `/api/cache` show it.
#[derive(Debug, Clone, Default)]
pub struct ModelReport {
    /// Its `/api/status` row.
    pub status: ModelStatus,
    /// Its `/api/cache` entry.
    pub cache: ModelCache,
}

/// The shape of a model's routed experts, read from its manifest at load: what slot sizes
/// follow from (until the cache reports its own slot size).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertLayout {
    /// Routed experts in the model.
    pub experts: usize,
    /// Bytes of the largest expert: one slot holds any expert.
    pub slot_bytes: u64,
}

impl ExpertLayout {
    /// The layout of `manifest`'s experts.
    pub fn of(manifest: &Manifest) -> ExpertLayout {
        ExpertLayout {
            experts: manifest.experts.len(),
            slot_bytes: manifest.experts.iter().map(|e| e.bytes).max().unwrap_or(0),
        }
    }

    /// Slots that fit in `bytes` (at least one when bytes are given).
    fn slots_in(self, bytes: u64) -> usize {
        match (bytes, self.slot_bytes) {
            (0, _) => 0,
            (_, 0) => self.experts,
            (b, s) => usize::try_from((b / s).max(1)).unwrap_or(usize::MAX),
        }
    }
}

/// The report of the model `name`, opened with `tier`.
pub fn model_report(
    name: &str,
    sched: &CpuScheduler,
    tier: &TierConfig,
    layout: ExpertLayout,
) -> ModelReport {
    let (waiting, running) = sched.load();
    let kv = sched.runner().kv_cache();
    let cache = sched.runner().experts();
    let stats = cache.stats();
    let device_slots = cache.capacity();
    let status = ModelStatus {
        name: name.to_string(),
        waiting,
        running,
        kv_free_blocks: kv.free_blocks(),
        kv_blocks: kv.layout().num_blocks,
        expert_slots: device_slots,
        expert_hits: stats.device.hits,
        expert_misses: stats.device.misses,
        expert_evictions: stats.device_evictions,
        expert_bytes_read: stats.bytes_read,
    };
    let cache = model_cache(name, tier, layout, device_slots, &stats);
    ModelReport { status, cache }
}

/// The `/api/cache` entry of a model with `device_slots` device-tier slots.
pub fn model_cache(
    name: &str,
    tier: &TierConfig,
    layout: ExpertLayout,
    device_slots: usize,
    stats: &TierStats,
) -> ModelCache {
    // Slot size and host slots follow from the manifest and the configuration until the cache
    // exposes its own (`ExpertCache::slot_bytes`, `ExpertCache::host_slots`).
    let slot_bytes = layout.slot_bytes;
    let host_slots = layout.slots_in(tier.host_bytes).min(layout.experts);
    let device = TierCache {
        resident_bytes: stats.device_resident_bytes,
        resident_experts: stats.device_resident_experts,
        evictions: stats.device_evictions,
        ..tier_cache("device", device_slots, slot_bytes, stats.device)
    };
    let host = TierCache {
        budget_bytes: tier.host_bytes,
        resident_bytes: stats.host_resident_bytes,
        resident_experts: stats.host_resident_experts,
        evictions: stats.host_evictions,
        ..tier_cache("host", host_slots, slot_bytes, stats.host)
    };
    ModelCache {
        model: name.to_string(),
        policy: tier.policy.as_str().to_string(),
        tile_size: tier.tile_size as u64,
        prefetch_depth: tier.prefetch_depth,
        pinned_experts: tier.pinned.len(),
        storage: storage(tier, stats),
        tiers: vec![device, host],
        bytes_read: stats.bytes_read,
        h2d_bytes: stats.h2d_bytes,
        prefetch: PrefetchCache {
            issued: stats.prefetch.issued,
            used: stats.prefetch.used,
            wasted: stats.prefetch.wasted,
            late: stats.prefetch.late,
        },
        stall_seconds: stats.stall.as_secs_f64(),
        checksum_failures: stats.checksum_failures,
        read_failures: stats.read_failures,
    }
}

fn tier_cache(name: &str, slots: usize, slot_bytes: u64, lookups: Lookups) -> TierCache {
    let total = lookups.hits + lookups.misses;
    TierCache {
        tier: name.to_string(),
        slots,
        slot_bytes,
        budget_bytes: slot_bytes.saturating_mul(slots as u64),
        hits: lookups.hits,
        misses: lookups.misses,
        hit_ratio: if total == 0 {
            0.0
        } else {
            lookups.hits as f64 / total as f64
        },
        ..TierCache::default()
    }
}

/// The storage path: the backend the tier names in its counters (the one in use), else the
/// configured one; `direct` as configured until the cache reports whether the file was really
/// opened with O_DIRECT (`ExpertCache::direct`, from `ReadQueue::direct`).
fn storage(tier: &TierConfig, stats: &TierStats) -> StorageCache {
    let backend = if stats.source.is_empty() {
        match tier.io.backend {
            BackendChoice::Auto => "auto",
            BackendChoice::IoUring => "io_uring",
            BackendChoice::Pread => "pread",
        }
    } else {
        stats.source
    };
    StorageCache {
        backend: backend.to_string(),
        direct: tier.io.direct,
        queue_depth: tier.io.queue_depth,
    }
}

/// Stall events between two snapshots of a model's counters: the step's added stall time as
/// one event when nonzero. An interim for the histogram until the tier reports each wait
/// (`ExpertCache::drain_stalls`).
pub fn step_stalls(last: &TierStats, now: &TierStats) -> Vec<Duration> {
    let added = now.stall.saturating_sub(last.stall);
    if added.is_zero() {
        Vec::new()
    } else {
        vec![added]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_entry_carries_config_and_counters() {
        let tier = TierConfig {
            host_bytes: 10_000,
            pinned: vec![(0, 1)],
            ..TierConfig::default()
        };
        let mut stats = TierStats {
            source: "io_uring",
            bytes_read: 77,
            ..TierStats::default()
        };
        stats.device.hits = 3;
        stats.device.misses = 1;
        stats.host.misses = 1;
        stats.prefetch.late = 2;
        stats.stall = Duration::from_millis(1500);
        let layout = ExpertLayout {
            experts: 8,
            slot_bytes: 4096,
        };
        let c = model_cache("m", &tier, layout, 2, &stats);
        assert_eq!((c.policy.as_str(), c.tile_size), ("lru", 1 << 20));
        assert_eq!(c.storage.backend, "io_uring");
        assert_eq!(c.pinned_experts, 1);
        assert_eq!(c.tiers[0].tier, "device");
        assert_eq!((c.tiers[0].slots, c.tiers[0].budget_bytes), (2, 8192));
        assert!((c.tiers[0].hit_ratio - 0.75).abs() < 1e-12);
        assert_eq!(c.tiers[1].tier, "host");
        assert_eq!((c.tiers[1].slots, c.tiers[1].budget_bytes), (2, 10_000));
        assert_eq!((c.bytes_read, c.prefetch.late), (77, 2));
        assert!((c.stall_seconds - 1.5).abs() < 1e-12);
    }

    #[test]
    fn configured_backend_stands_in_until_the_tier_names_one() {
        let mut tier = TierConfig::default();
        tier.io.backend = BackendChoice::Pread;
        let c = model_cache(
            "m",
            &tier,
            ExpertLayout::default(),
            1,
            &TierStats::default(),
        );
        assert_eq!(c.storage.backend, "pread");
        assert_eq!(c.tiers[1].slots, 0);
    }

    #[test]
    fn a_step_with_stall_time_is_one_event() {
        let last = TierStats::default();
        let mut now = last.clone();
        assert!(step_stalls(&last, &now).is_empty());
        now.stall = Duration::from_millis(3);
        assert_eq!(step_stalls(&last, &now), [Duration::from_millis(3)]);
    }
}
