//! The tiers over real files: a small pack of experts written into a temporary directory.

use std::path::PathBuf;
use std::sync::Arc;

use tileflow_spdk::{BackendChoice, IoConfig, StorageError};

use super::*;
use crate::forward::{EngineError, ExpertProvider};
use crate::pack::manifest::{xxh3_hex, ProjectionExtent, FORMAT_VERSION};
use crate::spec::ModelSpec;

/// A pack of `layers` x `experts` experts of `bytes(layer, expert)` bytes each.
pub(super) struct TestPack {
    _dir: tempfile::TempDir,
    pub manifest: Arc<Manifest>,
    pub path: PathBuf,
    pub data: Vec<u8>,
}

impl TestPack {
    pub fn new(layers: usize, experts: usize, bytes: impl Fn(usize, usize) -> u64) -> TestPack {
        let config = serde_json::json!({
            "model_type": "olmoe", "hidden_size": 8, "num_attention_heads": 2,
            "num_hidden_layers": layers, "vocab_size": 16, "max_position_embeddings": 32,
            "rms_norm_eps": 1e-5, "num_experts": experts, "num_experts_per_tok": 1,
            "intermediate_size": 4
        });
        let spec = ModelSpec::from_config_str(&config.to_string(), "config.json").unwrap();
        let mut data = Vec::new();
        let mut list = Vec::new();
        let proj = |offset, shape| ProjectionExtent { offset, shape };
        for layer in 0..layers {
            for expert in 0..experts {
                let offset = data.len() as u64;
                let n = bytes(layer, expert);
                let start = data.len();
                let seed = (layer * 131 + expert * 17 + 1) as u64;
                data.extend((0..n).map(|i| ((i * 7 + seed * 29) % 251) as u8));
                let digest = xxh3_hex(&data[start..]);
                data.resize(
                    crate::pack::manifest::align_up(data.len() as u64) as usize,
                    0,
                );
                list.push(ExpertExtent {
                    layer,
                    expert,
                    offset,
                    bytes: n,
                    xxh3: digest,
                    gate: proj(0, [4, 8]),
                    up: proj(128, [4, 8]),
                    down: proj(256, [8, 4]),
                });
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("experts.tiles");
        std::fs::write(&path, &data).unwrap();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            name: "tiny".into(),
            spec,
            expert_dtype: Dtype::F32,
            experts_file_bytes: data.len() as u64,
            experts: list,
            source: "test".into(),
            source_files: Vec::new(),
            created_by: "test".into(),
        };
        TestPack {
            _dir: dir,
            manifest: Arc::new(manifest),
            path,
            data,
        }
    }

    /// The bytes (layer, expert) must have.
    pub fn expected(&self, layer: usize, expert: usize) -> &[u8] {
        let e = self.manifest.extent(layer, expert).unwrap();
        &self.data[e.offset as usize..(e.offset + e.bytes) as usize]
    }

    pub fn open(&self, config: &TierConfig) -> ExpertCache {
        ExpertCache::open(self.manifest.clone(), &self.path, config, CpuTierMemory).unwrap()
    }

    /// Overwrites one byte of experts.tiles.
    pub fn corrupt(&self, layer: usize, expert: usize, at: u64) {
        use std::os::unix::fs::FileExt;
        let e = self.manifest.extent(layer, expert).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .unwrap();
        let b = self.data[(e.offset + at) as usize] ^ 0xff;
        f.write_all_at(&[b], e.offset + at).unwrap();
    }
}

/// Pread backend, `slots` device slots, `host_bytes` of host tier, `tile_size`.
pub(super) fn config(slots: usize, host_bytes: u64, tile_size: usize) -> TierConfig {
    TierConfig {
        device_slots: Some(slots),
        host_bytes,
        tile_size,
        io: IoConfig {
            backend: BackendChoice::Pread,
            queue_depth: 4,
            ..IoConfig::default()
        },
        ..TierConfig::default()
    }
}

/// Prepares one expert and checks its bytes.
pub(super) fn get(c: &mut ExpertCache, pack: &TestPack, layer: usize, expert: usize) {
    c.prepare(layer, &[expert]).unwrap();
    let r = c.expert(layer, expert).unwrap();
    assert_eq!(
        r.bytes.host().unwrap(),
        pack.expected(layer, expert),
        "({layer}, {expert})"
    );
}

/// Runs every queued and in-flight fill to its end.
pub(super) fn settle(c: &mut ExpertCache) {
    loop {
        c.drain_ready();
        if let Some(done) = c.queue.wait() {
            c.on_completion(done);
        } else if !c.wait_one_copy() {
            return;
        }
    }
}

fn tier_error(e: &EngineError) -> &TierError {
    let EngineError::ExpertRead { source, .. } = e else {
        panic!("not an expert read error: {e:?}");
    };
    source.downcast_ref::<TierError>().unwrap()
}

#[test]
fn lru_and_lfru_evict_in_their_order() {
    let pack = TestPack::new(1, 4, |_, _| 5000);
    for (policy, kept, evicted) in [(EvictionPolicy::Lru, 1, 0), (EvictionPolicy::Lfru, 0, 1)] {
        let mut c = pack.open(&TierConfig {
            policy,
            ..config(2, 0, 4096)
        });
        for e in [0, 0, 0, 1, 2] {
            get(&mut c, &pack, 0, e);
        }
        assert!(c.is_resident(0, kept), "{policy:?}");
        assert!(!c.is_resident(0, evicted), "{policy:?}");
        assert!(c.is_resident(0, 2));
        assert_eq!(c.stats().device_evictions, 1);
        assert_eq!(c.stats().device.hits, 2);
        assert_eq!(c.stats().device.misses, 3);
    }
}

#[test]
fn pinned_experts_are_never_evicted() {
    let pack = TestPack::new(2, 3, |_, _| 6000);
    let mut cfg = config(2, 0, 4096);
    cfg.pinned = vec![(1, 2)];
    let mut c = pack.open(&cfg);
    assert_eq!(c.capacity(), 1);
    assert!(c.is_resident(1, 2));
    for (l, e) in [(0, 0), (0, 1), (1, 0), (0, 2), (1, 1), (0, 0)] {
        get(&mut c, &pack, l, e);
        assert!(c.is_resident(1, 2));
    }
    get(&mut c, &pack, 1, 2);
    assert!(c.stats().device_evictions >= 5);
    // Pins that fill the device tier leave no room for the rest.
    cfg.pinned = vec![(0, 0), (0, 1)];
    let err =
        ExpertCache::open(pack.manifest.clone(), &pack.path, &cfg, CpuTierMemory).unwrap_err();
    assert!(matches!(err, TierError::Config { .. }), "{err}");
    cfg.pinned = vec![(0, 7)];
    let err =
        ExpertCache::open(pack.manifest.clone(), &pack.path, &cfg, CpuTierMemory).unwrap_err();
    assert!(
        matches!(err, TierError::NoSuchExpert { expert: 7, .. }),
        "{err}"
    );
}

#[test]
fn host_tier_hit_after_device_eviction_reads_no_storage() {
    let pack = TestPack::new(1, 4, |_, e| 9000 + e as u64 * 100);
    let slot = 12288;
    let mut c = pack.open(&config(1, 3 * slot, 4096));
    assert_eq!(c.host_slots(), 3);
    get(&mut c, &pack, 0, 0);
    get(&mut c, &pack, 0, 1);
    assert!(!c.is_resident(0, 0) && c.is_host_resident(0, 0));
    let before = c.stats();
    get(&mut c, &pack, 0, 0);
    let after = c.stats();
    assert_eq!(after.bytes_read, before.bytes_read);
    assert_eq!(after.host.hits, before.host.hits + 1);
    assert_eq!(after.h2d_bytes, before.h2d_bytes + 9000);
    // A fourth expert evicts the least recent host slot.
    get(&mut c, &pack, 0, 2);
    get(&mut c, &pack, 0, 3);
    assert_eq!(c.stats().host_evictions, 1);
    assert_eq!(c.stats().host_resident_experts, 3);
    assert_eq!(c.stats().source, "pread");
}

#[test]
fn staging_ring_smaller_than_an_expert_and_uneven_tiles() {
    // 5 tiles of 4096 per expert through a ring of 2; then 8192-byte tiles that do not divide
    // the experts, with a host tier.
    let pack = TestPack::new(2, 3, |l, e| 18_000 + (l * 3 + e) as u64 * 333);
    for cfg in [config(2, 0, 4096), config(2, 2 * 24_576, 8192)] {
        let mut cfg = cfg;
        cfg.io.queue_depth = 2;
        let mut c = pack.open(&cfg);
        for (l, e) in [(0, 0), (1, 2), (0, 1), (1, 0), (0, 0), (1, 1), (0, 2)] {
            get(&mut c, &pack, l, e);
        }
        // Both experts of one call, through the same ring.
        c.prepare(1, &[0, 2]).unwrap();
        for e in [0, 2] {
            assert_eq!(
                c.expert(1, e).unwrap().bytes.host().unwrap(),
                pack.expected(1, e)
            );
        }
        if c.host_slots() == 0 {
            assert_eq!(c.ring.len(), 2, "every staging buffer came back");
        }
    }
}

#[test]
fn bad_tile_size_is_a_config_error() {
    let pack = TestPack::new(1, 1, |_, _| 100);
    for ts in [0, 1000, 4097] {
        let err = ExpertCache::open(
            pack.manifest.clone(),
            &pack.path,
            &config(1, 0, ts),
            CpuTierMemory,
        )
        .unwrap_err();
        assert!(err.to_string().contains("tile size"), "{err}");
    }
}

#[test]
fn checksum_mismatch_fails_that_expert_only() {
    let pack = TestPack::new(2, 2, |_, _| 10_000);
    pack.corrupt(1, 1, 5000);
    for host in [0, 4 * 12_288] {
        let mut c = pack.open(&config(2, host, 4096));
        let err = c.prepare(1, &[1]).unwrap_err();
        let msg = crate::error_chain(&err);
        match tier_error(&err) {
            TierError::Checksum {
                layer: 1,
                expert: 1,
                offset,
                path,
                ..
            } => {
                assert_eq!(*offset, pack.manifest.extent(1, 1).unwrap().offset);
                assert!(path.ends_with("experts.tiles"));
            }
            other => panic!("{other}"),
        }
        assert!(
            msg.contains("layer 1 expert 1") && msg.contains("experts.tiles"),
            "{msg}"
        );
        assert!(!c.is_resident(1, 1) && !c.is_host_resident(1, 1));
        assert_eq!(c.stats().checksum_failures, 1);
        get(&mut c, &pack, 1, 0);
        get(&mut c, &pack, 0, 1);
        // A retry reads it again and fails again.
        assert!(c.prepare(1, &[0, 1]).is_err());
        assert_eq!(c.stats().checksum_failures, 2);
        assert!(c.is_resident(1, 0));
    }
}

#[test]
fn truncated_file_fails_experts_past_the_cut() {
    let pack = TestPack::new(1, 4, |_, _| 8000);
    let mut c = pack.open(&config(4, 0, 4096));
    let cut = pack.manifest.extent(0, 2).unwrap().offset + 4096 + 100;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&pack.path)
        .unwrap()
        .set_len(cut)
        .unwrap();
    get(&mut c, &pack, 0, 0);
    get(&mut c, &pack, 0, 1);
    for e in [2, 3] {
        let err = c.prepare(0, &[e]).unwrap_err();
        match tier_error(&err) {
            TierError::Read {
                layer: 0,
                expert,
                offset,
                source: StorageError::ShortFile { path, file_len, .. },
                ..
            } => {
                assert_eq!(*expert, e);
                assert_eq!(*offset, pack.manifest.extent(0, e).unwrap().offset);
                assert_eq!(*file_len, cut);
                assert_eq!(path, &pack.path);
            }
            other => panic!("{other:?}"),
        }
        assert!(!c.is_resident(0, e));
    }
    assert_eq!(c.stats().read_failures, 2);
    get(&mut c, &pack, 0, 1);
    assert_eq!(c.ring.len(), 4);
}

#[test]
fn warming_reads_every_expert_once_and_starts_the_counters_again() {
    let pack = TestPack::new(2, 3, |l, e| 5000 + (l * 3 + e) as u64 * 10);
    // Room for every expert: all resident afterwards, no look-ahead needed.
    let mut c = pack.open(&config(6, 0, 4096));
    assert!(!c.all_resident());
    c.warm().unwrap();
    assert!(c.all_resident());
    assert_eq!(c.stats().bytes_read, 0);
    assert_eq!(c.stats().device_resident_experts, 6);
    for (l, e) in [(0, 0), (1, 2)] {
        get(&mut c, &pack, l, e);
    }
    assert_eq!(c.stats().device.hits, 2);
    assert_eq!(c.stats().bytes_read, 0);
    // Two device slots and a host tier for everything: the host holds all, the device the last.
    let mut small = pack.open(&config(2, 6 * 8192, 4096));
    small.warm().unwrap();
    assert!(!small.all_resident());
    assert_eq!(small.stats().host_resident_experts, 6);
    assert!(small.is_resident(1, 2));
}
