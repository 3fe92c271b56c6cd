//! What the engine thread reports about a loaded model: its `/api/status` row and its
//! `/api/cache` entry, built from the tier's counters ([`TierStats`]) and the tier
//! configuration the model was opened with ([`TierConfig`]) and what the cache says of itself
//! ([`CacheFacts`]), on whichever backend and tier memory the model runs.

use tileflow_client::native::{ModelCache, ModelStatus, PrefetchCache, StorageCache, TierCache};
use tileflow_engine::backend::Backend;
use tileflow_engine::sched::Scheduler;
use tileflow_engine::tier::{ExpertCache, Lookups, TierConfig, TierMemory, TierStats};

/// One loaded model, as `/api/status` and `/api/cache` show it.
#[derive(Debug, Clone, Default)]
pub struct ModelReport {
    /// Its `/api/status` row.
    pub status: ModelStatus,
    /// Its `/api/cache` entry.
    pub cache: ModelCache,
}

/// What the expert cache itself says about its tiers (as opened, not as configured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheFacts {
    /// Device-tier slots the forward pass can use.
    pub device_slots: usize,
    /// Host-tier slots (0: staging ring only).
    pub host_slots: usize,
    /// Bytes of one slot.
    pub slot_bytes: u64,
    /// Storage backend in use.
    pub backend: &'static str,
    /// Whether reads bypass the page cache.
    pub direct: bool,
}

impl CacheFacts {
    /// The facts of a loaded model's cache.
    pub fn of<M: TierMemory>(cache: &ExpertCache<M>) -> CacheFacts {
        CacheFacts {
            device_slots: cache.capacity(),
            host_slots: cache.host_slots(),
            slot_bytes: cache.slot_bytes() as u64,
            backend: cache.backend().as_str(),
            direct: cache.direct(),
        }
    }
}

/// The report of the model `name`, opened with `tier`.
pub fn model_report<B: Backend, M: TierMemory>(
    name: &str,
    sched: &Scheduler<B, ExpertCache<M>>,
    tier: &TierConfig,
) -> ModelReport {
    let (waiting, running) = sched.load();
    let kv = sched.runner().kv_cache();
    let cache = sched.runner().experts();
    let stats = cache.stats();
    let facts = CacheFacts::of(cache);
    let device_slots = facts.device_slots;
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
    let cache = model_cache(name, tier, facts, &stats);
    ModelReport { status, cache }
}

/// The `/api/cache` entry of a model opened with `tier` whose cache reports `facts`.
pub fn model_cache(
    name: &str,
    tier: &TierConfig,
    facts: CacheFacts,
    stats: &TierStats,
) -> ModelCache {
    let (slot_bytes, host_slots, device_slots) =
        (facts.slot_bytes, facts.host_slots, facts.device_slots);
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
        storage: StorageCache {
            backend: facts.backend.to_string(),
            direct: facts.direct,
            queue_depth: tier.io.queue_depth,
        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
        let facts = CacheFacts {
            device_slots: 2,
            host_slots: 2,
            slot_bytes: 4096,
            backend: "io_uring",
            direct: true,
        };
        let c = model_cache("m", &tier, facts, &stats);
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
}
