//! `[cache]` and `[storage]`: how each loaded model's expert tiers are sized and fed, and
//! their mapping onto the engine's [`TierConfig`]. None of these keys changes a model that is
//! already loaded: a SIGHUP hands the new values to the engine for models loaded after it.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use tileflow_engine::tier::{CpuExperts, EvictionPolicy, TierConfig, Verify};
use tileflow_spdk::{BackendChoice, IoConfig};

use super::units::ByteSize;
use super::{invalid, Config, InvalidValue};

/// When expert checksums are verified as experts are read from storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheVerify {
    /// The first time each expert is read.
    #[default]
    First,
    /// Every read.
    Always,
    /// Never (raw-path benchmarks only).
    Never,
}

impl From<CacheVerify> for Verify {
    fn from(v: CacheVerify) -> Verify {
        match v {
            CacheVerify::First => Verify::First,
            CacheVerify::Always => Verify::Always,
            CacheVerify::Never => Verify::Never,
        }
    }
}

/// `[cache]`: the expert tiers of each loaded model (every budget is per model).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of device-tier slots per model; 0 holds every expert of the model.
    pub device_bytes: ByteSize,
    /// Device-tier slots per model, overriding `device_bytes` when nonzero.
    pub expert_slots: usize,
    /// Bytes of host-tier slots per model; 0: no host tier (a small staging ring).
    pub host_bytes: ByteSize,
    /// Eviction policy of both tiers.
    pub policy: CachePolicy,
    /// Checksum verification of expert reads.
    pub verify: CacheVerify,
    /// I/O and DMA unit, a positive multiple of 4096.
    pub tile_size: ByteSize,
    /// MoE layers of router look-ahead; 0 turns prefetch off.
    pub prefetch_depth: usize,
    /// Prefetch token-bucket refill in bytes per second; 0 is unpaced.
    pub prefetch_rate: ByteSize,
    /// Prefetch bytes in flight at most (the bucket's depth).
    pub prefetch_burst: ByteSize,
    /// Experts pinned in the device tier from load on.
    #[serde(deserialize_with = "pin_list")]
    pub pin: Vec<ExpertPin>,
    /// Hybrid execution: device-tier misses computed on the CPU from the host tier.
    pub cpu_experts: CacheCpuExperts,
}

/// `cache.cpu_experts`: which device-tier misses the CPU computes from the host tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheCpuExperts {
    /// As many as the cost model says (on a GPU backend).
    #[default]
    Auto,
    /// None.
    Never,
    /// Every host-tier miss.
    Always,
}

impl From<CacheCpuExperts> for CpuExperts {
    fn from(c: CacheCpuExperts) -> CpuExperts {
        match c {
            CacheCpuExperts::Auto => CpuExperts::Auto,
            CacheCpuExperts::Never => CpuExperts::Never,
            CacheCpuExperts::Always => CpuExperts::Always,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> CacheConfig {
        let tier = TierConfig::default();
        CacheConfig {
            device_bytes: ByteSize(0),
            expert_slots: 0,
            host_bytes: ByteSize(tier.host_bytes),
            policy: CachePolicy::Lru,
            verify: CacheVerify::First,
            tile_size: ByteSize(tier.tile_size as u64),
            prefetch_depth: tier.prefetch_depth,
            prefetch_rate: ByteSize(tier.prefetch_rate_bytes),
            prefetch_burst: ByteSize(tier.prefetch_burst_bytes),
            pin: Vec::new(),
            cpu_experts: CacheCpuExperts::Auto,
        }
    }
}

/// Which expert leaves a full tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CachePolicy {
    /// Least recently used.
    #[default]
    Lru,
    /// Least frequently used with decay, recency breaking ties.
    Lfru,
}

impl From<CachePolicy> for EvictionPolicy {
    fn from(p: CachePolicy) -> EvictionPolicy {
        match p {
            CachePolicy::Lru => EvictionPolicy::Lru,
            CachePolicy::Lfru => EvictionPolicy::Lfru,
        }
    }
}

/// Which storage backend reads expert tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    /// io_uring when the kernel allows it, else pread.
    #[default]
    Auto,
    /// io_uring, or the model fails to load.
    IoUring,
    /// pread on a thread pool.
    Pread,
}

impl From<StorageBackend> for BackendChoice {
    fn from(b: StorageBackend) -> BackendChoice {
        match b {
            StorageBackend::Auto => BackendChoice::Auto,
            StorageBackend::IoUring => BackendChoice::IoUring,
            StorageBackend::Pread => BackendChoice::Pread,
        }
    }
}

/// `[storage]`: how expert tiles are read from `experts.tiles`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Backend choice.
    pub backend: StorageBackend,
    /// Reads in flight at most per model.
    pub queue_depth: u32,
    /// io_uring: a kernel thread polls the submission queue.
    pub sqpoll: bool,
    /// Open packs with O_DIRECT (falls back to buffered reads where refused).
    pub direct: bool,
}

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        let io = IoConfig::default();
        StorageConfig {
            backend: StorageBackend::Auto,
            queue_depth: io.queue_depth,
            sqpoll: io.sqpoll,
            direct: io.direct,
        }
    }
}

use tileflow_spdk::MAX_QUEUE_DEPTH;

/// Alignment of tiles on storage and in DMA buffers.
const TILE_ALIGN: u64 = 4096;

impl Config {
    /// How models loaded under this configuration size and run their expert tiers.
    pub fn tier(&self) -> TierConfig {
        let c = &self.cache;
        let s = &self.storage;
        TierConfig {
            device_bytes: (c.device_bytes.bytes() > 0).then_some(c.device_bytes.bytes()),
            device_slots: (c.expert_slots > 0).then_some(c.expert_slots),
            host_bytes: c.host_bytes.bytes(),
            policy: c.policy.into(),
            verify: c.verify.into(),
            // validate() keeps tile_size small; a value that does not fit falls back to the default.
            tile_size: usize::try_from(c.tile_size.bytes())
                .unwrap_or(TierConfig::default().tile_size),
            io: IoConfig {
                backend: s.backend.into(),
                queue_depth: s.queue_depth,
                sqpoll: s.sqpoll,
                direct: s.direct,
            },
            pinned: c.pin.iter().map(|p| (p.layer, p.expert)).collect(),
            prefetch_depth: c.prefetch_depth,
            prefetch_rate_bytes: c.prefetch_rate.bytes(),
            prefetch_burst_bytes: c.prefetch_burst.bytes(),
            cpu_experts: c.cpu_experts.into(),
        }
    }
}

impl CacheConfig {
    pub(super) fn validate(&self) -> Result<(), InvalidValue> {
        let tile = self.tile_size.bytes();
        if tile == 0 || !tile.is_multiple_of(TILE_ALIGN) {
            return Err(invalid(
                "cache.tile_size",
                format_args!(
                    "({}) must be a positive multiple of 4096 bytes (4KiB)",
                    self.tile_size
                ),
            ));
        }
        if tile > 1 << 30 {
            return Err(invalid(
                "cache.tile_size",
                format_args!("({}) must be at most 1GiB", self.tile_size),
            ));
        }
        if self.prefetch_depth > 0 && self.prefetch_burst.bytes() < tile {
            return Err(invalid(
                "cache.prefetch_burst",
                format_args!(
                    "({}) is smaller than cache.tile_size ({}): no prefetch read would fit; \
                     set cache.prefetch_depth = 0 to turn prefetch off",
                    self.prefetch_burst, self.tile_size
                ),
            ));
        }
        for (i, pin) in self.pin.iter().enumerate() {
            if self.pin[..i].contains(pin) {
                return Err(invalid("cache.pin", format_args!("names \"{pin}\" twice")));
            }
        }
        Ok(())
    }
}

impl StorageConfig {
    pub(super) fn validate(&self) -> Result<(), InvalidValue> {
        if !(1..=MAX_QUEUE_DEPTH).contains(&self.queue_depth) {
            return Err(invalid(
                "storage.queue_depth",
                format_args!(
                    "({}) must be between 1 and {MAX_QUEUE_DEPTH}",
                    self.queue_depth
                ),
            ));
        }
        Ok(())
    }
}

/// One pinned expert, written `"LAYER:EXPERT"` (`"3:17"`): kept in the device tier from load on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ExpertPin {
    /// Decoder layer.
    pub layer: usize,
    /// Routed expert within the layer.
    pub expert: usize,
}

impl FromStr for ExpertPin {
    type Err = String;

    fn from_str(text: &str) -> Result<ExpertPin, String> {
        let bad = || format!("\"{text}\" is not an expert such as \"3:17\" (LAYER:EXPERT)");
        let (layer, expert) = text.trim().split_once(':').ok_or_else(bad)?;
        let number = |s: &str| {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse::<usize>().map_err(|_| bad())
        };
        Ok(ExpertPin {
            layer: number(layer)?,
            expert: number(expert)?,
        })
    }
}

impl fmt::Display for ExpertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.layer, self.expert)
    }
}

impl Serialize for ExpertPin {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ExpertPin {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ExpertPin, D::Error> {
        String::deserialize(d)?.parse().map_err(de::Error::custom)
    }
}

/// A list of pins from a TOML array of strings or one comma-separated string (the form an
/// environment variable takes: `TILEFLOW_CACHE__PIN=0:3,1:7`).
fn pin_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ExpertPin>, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = Vec<ExpertPin>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of \"LAYER:EXPERT\" strings, or one comma-separated string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Vec<ExpertPin>, E> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().map_err(E::custom))
                .collect()
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<ExpertPin>, A::Error> {
            let mut out = Vec::new();
            while let Some(pin) = seq.next_element::<ExpertPin>()? {
                out.push(pin);
            }
            Ok(out)
        }
    }
    d.deserialize_any(V)
}
