//! The native API's bodies (`/api/*`, `/health`). Answers decode leniently (missing fields
//! take defaults, unknown fields are ignored) so that a newer daemon still talks to an older
//! client; requests are strict.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::openai::ErrorDetail;

/// A model in the store (`GET /api/models`, `GET /api/models/{name}`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelSummary {
    /// Name in the store.
    pub name: String,
    /// `model_type` of its family ("mixtral", "qwen3_moe", …).
    pub family: String,
    /// Decoder layers.
    pub layers: usize,
    /// Routed experts per MoE layer.
    pub experts_per_layer: usize,
    /// Experts each token is routed to.
    pub experts_per_token: usize,
    /// Dtype of the expert tiles.
    pub expert_dtype: String,
    /// Bytes of all routed experts.
    pub expert_bytes: u64,
    /// Bytes of the pack on disk.
    pub disk_bytes: u64,
    /// Where it was imported from.
    pub source: String,
    /// Whether the daemon has it loaded.
    pub loaded: bool,
    /// The model spec (only from `GET /api/models/{name}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spec: Option<serde_json::Value>,
}

/// `GET /api/models`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelListing {
    /// Every model in the store.
    pub models: Vec<ModelSummary>,
}

/// The answer of load, unload and rm.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelAction {
    /// "loaded", "unloaded", "removed".
    pub status: String,
    /// The model.
    pub name: String,
}

/// `POST /api/models/import`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// A checkpoint directory on the daemon's host (absolute: the daemon has its own working
    /// directory).
    pub path: PathBuf,
    /// The name in the store (default: the directory's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// One NDJSON line of an import: progress, then a last line with `status` "success" or
/// "error".
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ImportProgress {
    /// "importing", "success" or "error".
    pub status: String,
    /// Bytes written so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub done_bytes: Option<u64>,
    /// Bytes to write in all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_bytes: Option<u64>,
    /// The model's name (on success).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What failed (on error).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// One loaded model's state (`GET /api/status`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelStatus {
    /// Name.
    pub name: String,
    /// Requests queued behind the running batch.
    pub waiting: usize,
    /// Requests in the running batch.
    pub running: usize,
    /// Free blocks of the paged KV cache.
    pub kv_free_blocks: usize,
    /// Blocks of the KV cache in all.
    pub kv_blocks: usize,
    /// Routed-expert slots of its tile cache.
    pub expert_slots: usize,
    /// Expert lookups that found the expert resident.
    pub expert_hits: u64,
    /// Lookups that had to read it.
    pub expert_misses: u64,
    /// Experts evicted.
    pub expert_evictions: u64,
    /// Bytes read from storage.
    pub expert_bytes_read: u64,
}

/// `GET /api/status`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Status {
    /// Daemon version.
    pub version: String,
    /// The compute device, chosen once at start: "cpu", or a GPU as
    /// "cuda:0 (NVIDIA H100 80GB HBM3, 79.1 GiB, sm_90)".
    pub device: String,
    /// Seconds since start.
    pub uptime_seconds: u64,
    /// The model store.
    pub state_dir: Option<String>,
    /// Loaded models.
    pub models: Vec<ModelStatus>,
}

/// One tier of a model's expert cache (`GET /api/cache`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TierCache {
    /// "device" (the backend's memory: VRAM on CUDA) or "host" (page-locked host memory).
    pub tier: String,
    /// Expert slots.
    pub slots: usize,
    /// Bytes of one slot (the model's largest expert).
    pub slot_bytes: u64,
    /// Bytes of slots this model may hold in the tier.
    pub budget_bytes: u64,
    /// Bytes of slots allocated now.
    pub resident_bytes: u64,
    /// Experts resident now.
    pub resident_experts: usize,
    /// Lookups that found the expert resident.
    pub hits: u64,
    /// Lookups that did not.
    pub misses: u64,
    /// hits / (hits + misses), 0 before any lookup.
    pub hit_ratio: f64,
    /// Experts evicted.
    pub evictions: u64,
}

/// What happened to a model's prefetches.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefetchCache {
    /// Fetches queued for predicted experts.
    pub issued: u64,
    /// Prefetched experts resident when the forward pass asked for them.
    pub used: u64,
    /// Prefetched experts evicted or dropped before anyone asked for them.
    pub wasted: u64,
    /// Prefetched experts asked for while still being read.
    pub late: u64,
}

/// How a model's experts are read from storage.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StorageCache {
    /// The backend reading (`"io_uring"`, `"pread"`).
    pub backend: String,
    /// Whether reads bypass the page cache (O_DIRECT).
    pub direct: bool,
    /// Reads in flight at most.
    pub queue_depth: u32,
}

/// One model's expert cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModelCache {
    /// Model name.
    pub model: String,
    /// Eviction policy: "lru" or "lfru".
    pub policy: String,
    /// I/O and DMA unit in bytes.
    pub tile_size: u64,
    /// Router look-ahead layers; 0: prefetch off.
    pub prefetch_depth: usize,
    /// Experts pinned in the device tier.
    pub pinned_experts: usize,
    /// The storage path.
    pub storage: StorageCache,
    /// Its tiers, fastest first: "device", then "host".
    pub tiers: Vec<TierCache>,
    /// Bytes read from storage.
    pub bytes_read: u64,
    /// Bytes copied host → device.
    pub h2d_bytes: u64,
    /// Prefetch outcomes.
    pub prefetch: PrefetchCache,
    /// Seconds the forward pass waited for experts.
    pub stall_seconds: f64,
    /// Expert reads whose checksum did not match the manifest.
    pub checksum_failures: u64,
    /// Expert reads that failed (I/O errors, short files).
    pub read_failures: u64,
}

/// `GET /api/cache`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheReport {
    /// Each loaded model's cache.
    pub models: Vec<ModelCache>,
}

/// `GET /health`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Health {
    /// "ok".
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_decode_leniently() {
        let s: Status =
            serde_json::from_str(r#"{"version":"0.1.0","device":"cpu","new_field":1}"#).unwrap();
        assert_eq!(s.device, "cpu");
        assert!(s.models.is_empty());
        let p: ImportProgress = serde_json::from_str(
            r#"{"status":"error","error":{"message":"m","type":"import_error","code":null}}"#,
        )
        .unwrap();
        assert_eq!(p.error.unwrap().kind, "import_error");
    }

    #[test]
    fn import_request_omits_a_missing_name() {
        let r = ImportRequest {
            path: "/ckpt".into(),
            name: None,
        };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"path":"/ckpt"}"#);
    }
}
