//! How a model's expert tiers are sized and run, and the counters they keep.

use std::time::Duration;

use tileflow_spdk::IoConfig;

use super::Verify;

/// Which expert leaves a full tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvictionPolicy {
    /// Least recently used.
    #[default]
    Lru,
    /// Frequency-aware: least frequently used, with counts halved every `decay_every` lookups,
    /// recency breaking ties (LFU with decay / LFRU): hot experts survive a burst of cold ones.
    Lfru,
}

impl EvictionPolicy {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionPolicy::Lru => "lru",
            EvictionPolicy::Lfru => "lfru",
        }
    }
}

/// Whether selected experts that miss the device tier but sit in the host tier are computed
/// on the CPU from their host slots (hybrid execution) instead of being copied to the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuExperts {
    /// Per step, as many as the cost model says let the CPU and the copies finish together,
    /// where the backend computes on a device apart from the host (on the CPU backend, never).
    #[default]
    Auto,
    /// Never: every selected expert is copied to the device tier.
    Never,
    /// Every host-tier expert that misses the device tier (tests and benchmarks).
    Always,
}

impl CpuExperts {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CpuExperts::Auto => "auto",
            CpuExperts::Never => "never",
            CpuExperts::Always => "always",
        }
    }
}

/// Sizes and behaviour of one model's expert tiers.
#[derive(Debug, Clone, PartialEq)]
pub struct TierConfig {
    /// Bytes of device-tier slots (the Backend's memory: VRAM on CUDA). `None` holds every
    /// expert of the model. At least one slot is always allocated.
    pub device_bytes: Option<u64>,
    /// Device-tier slots, overriding `device_bytes` when set (tests, `--expert-slots`).
    pub device_slots: Option<usize>,
    /// Bytes of host-tier slots (page-locked host memory; default 1 GiB, capped at the model's
    /// experts). Whole experts land there without the engine thread's help, which is what lets
    /// prefetch reads run while the engine computes. 0: no host tier, reads go through a small
    /// staging ring straight to the device tier (prefetch then gains little: each ring tile
    /// waits for the engine thread to copy it out).
    pub host_bytes: u64,
    /// Eviction policy of both tiers.
    pub policy: EvictionPolicy,
    /// When expert checksums are verified.
    pub verify: Verify,
    /// I/O and DMA unit: an expert is read as `ceil(bytes / tile_size)` tiles, each copied to the
    /// device as soon as it lands. A positive multiple of 4096.
    pub tile_size: usize,
    /// Storage backend, queue depth, SQPOLL, O_DIRECT.
    pub io: IoConfig,
    /// Experts kept resident in the device tier from load on, never evicted: (layer, expert).
    pub pinned: Vec<(usize, usize)>,
    /// MoE layers ahead whose experts the prefetcher predicts after each router (router
    /// look-ahead); 0 turns prefetch off.
    pub prefetch_depth: usize,
    /// Prefetch pacing: the token bucket refills at this many bytes per second (0: no rate
    /// limit, only the in-flight cap). Demand reads never wait for the bucket.
    pub prefetch_rate_bytes: u64,
    /// Prefetch pacing: most prefetch bytes in flight at once (the bucket's depth).
    pub prefetch_burst_bytes: u64,
    /// Hybrid execution: which device-tier misses run on the CPU from the host tier.
    pub cpu_experts: CpuExperts,
}

impl Default for TierConfig {
    fn default() -> TierConfig {
        TierConfig {
            device_bytes: None,
            device_slots: None,
            host_bytes: 1 << 30,
            policy: EvictionPolicy::Lru,
            verify: Verify::First,
            tile_size: 1 << 20,
            io: IoConfig::default(),
            pinned: Vec::new(),
            prefetch_depth: 1,
            prefetch_rate_bytes: 0,
            prefetch_burst_bytes: 256 << 20,
            cpu_experts: CpuExperts::Auto,
        }
    }
}

/// Lookups that hit or missed one tier.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lookups {
    /// Found resident.
    pub hits: u64,
    /// Not resident.
    pub misses: u64,
}

/// What happened to prefetches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchCounts {
    /// Hints received for experts not yet resident or in flight (fetches queued).
    pub issued: u64,
    /// Prefetched experts that were resident when the forward pass asked for them.
    pub used: u64,
    /// Prefetched experts evicted (or dropped) before anyone asked for them.
    pub wasted: u64,
    /// Prefetched experts asked for while their read was still queued or in flight.
    pub late: u64,
}

/// Experts run, and the bytes of their weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounts {
    /// Experts (one per layer and step that selected it).
    pub experts: u64,
    /// Their extents' bytes.
    pub bytes: u64,
}

/// Counters of one model's tiers since load (monotonic, except the resident gauges).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TierStats {
    /// Device-tier lookups by the forward pass.
    pub device: Lookups,
    /// Host-tier lookups (made on device-tier misses).
    pub host: Lookups,
    /// Experts evicted from the device tier.
    pub device_evictions: u64,
    /// Experts evicted from the host tier.
    pub host_evictions: u64,
    /// Bytes read from storage, with the backend that read them ("io_uring", "pread").
    pub bytes_read: u64,
    /// Storage backend name.
    pub source: &'static str,
    /// Bytes copied host → device.
    pub h2d_bytes: u64,
    /// Prefetch outcomes.
    pub prefetch: PrefetchCounts,
    /// Experts the backend ran from the device tier.
    pub ran_device: RunCounts,
    /// Experts the CPU ran from the host tier (hybrid execution).
    pub ran_host: RunCounts,
    /// Checksum mismatches found.
    pub checksum_failures: u64,
    /// Read failures (I/O errors, short files).
    pub read_failures: u64,
    /// Total time the forward pass waited for experts.
    pub stall: Duration,
    /// Bytes of device-tier slots allocated.
    pub device_resident_bytes: u64,
    /// Bytes of host-tier slots allocated.
    pub host_resident_bytes: u64,
    /// Experts resident in the device tier now.
    pub device_resident_experts: usize,
    /// Experts resident in the host tier now.
    pub host_resident_experts: usize,
}
