//! Prometheus metrics (CONVENTIONS.md: `tileflow_` prefix, base units, `_total` counters, no
//! per-request labels). Counters and gauges are atomics: the engine thread updates them
//! without sharing a lock with the API.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tileflow_engine::tier::TierStats;

/// Labels of `tileflow_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Model name.
    pub model: String,
    /// "stop", "length", "error", "cancelled", "timeout".
    pub finish_reason: String,
}

/// The cache tier a lookup was answered from.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Tier {
    /// The host tier (the CPU backend's expert slots).
    host,
}

/// Hit or miss.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LookupResult {
    /// Resident.
    hit,
    /// Read from storage.
    miss,
}

/// Labels of `tileflow_tile_cache_lookups_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LookupLabels {
    /// The tier.
    pub tier: Tier,
    /// The result.
    pub result: LookupResult,
}

/// Labels of `tileflow_tile_bytes_read_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// The storage backend ("pread").
    pub source: String,
}

/// Labels of `tileflow_tile_cache_resident_bytes`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    /// The tier.
    pub tier: Tier,
}

/// Every metric the daemon exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Finished requests.
    pub requests: Family<RequestLabels, Counter>,
    /// Prompt tokens prefilled.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generation_tokens: Counter,
    /// Requests in running batches.
    pub requests_running: Gauge,
    /// Requests waiting.
    pub requests_waiting: Gauge,
    /// Request arrival to first token.
    pub time_to_first_token: Histogram,
    /// Between consecutive tokens of a request.
    pub inter_token_latency: Histogram,
    /// Request arrival to its end.
    pub e2e_request_latency: Histogram,
    /// Request arrival to its first step (queueing).
    pub queue_time: Histogram,
    /// Expert lookups by tier and result.
    pub cache_lookups: Family<LookupLabels, Counter>,
    /// Expert bytes read from storage.
    pub bytes_read: Family<SourceLabels, Counter>,
    /// Expert slots in use, in bytes.
    pub resident_bytes: Family<TierLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Metrics {
        let latency = || Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let mut m = Metrics {
            registry: Registry::with_prefix("tileflow"),
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            requests_running: Gauge::default(),
            requests_waiting: Gauge::default(),
            time_to_first_token: latency(),
            inter_token_latency: latency(),
            e2e_request_latency: latency(),
            queue_time: latency(),
            cache_lookups: Family::default(),
            bytes_read: Family::default(),
            resident_bytes: Family::default(),
        };
        let r = &mut m.registry;
        r.register(
            "requests",
            "Finished requests by model and finish reason",
            m.requests.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens prefilled",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        r.register(
            "requests_running",
            "Requests in a running batch",
            m.requests_running.clone(),
        );
        r.register(
            "requests_waiting",
            "Requests waiting to join a batch",
            m.requests_waiting.clone(),
        );
        r.register_with_unit(
            "time_to_first_token",
            "Time from request arrival to its first token",
            prometheus_client::registry::Unit::Seconds,
            m.time_to_first_token.clone(),
        );
        r.register_with_unit(
            "inter_token_latency",
            "Time between consecutive tokens of a request",
            prometheus_client::registry::Unit::Seconds,
            m.inter_token_latency.clone(),
        );
        r.register_with_unit(
            "e2e_request_latency",
            "Time from request arrival to its end",
            prometheus_client::registry::Unit::Seconds,
            m.e2e_request_latency.clone(),
        );
        r.register_with_unit(
            "queue_time",
            "Time from request arrival to its first token or refusal",
            prometheus_client::registry::Unit::Seconds,
            m.queue_time.clone(),
        );
        r.register(
            "tile_cache_lookups",
            "Routed-expert lookups by tier and result",
            m.cache_lookups.clone(),
        );
        // Named in full: with a unit the encoder would write `tile_bytes_read_bytes_total`.
        r.register(
            "tile_bytes_read",
            "Routed-expert bytes read from storage",
            m.bytes_read.clone(),
        );
        r.register_with_unit(
            "tile_cache_resident",
            "Bytes of routed experts resident per tier",
            prometheus_client::registry::Unit::Bytes,
            m.resident_bytes.clone(),
        );
        m
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Adds one model's expert cache progress since `last`.
    pub fn record_cache(&self, last: &TierStats, now: &TierStats) {
        let lookup = |result| LookupLabels {
            tier: Tier::host,
            result,
        };
        self.cache_lookups
            .get_or_create(&lookup(LookupResult::hit))
            .inc_by(now.device.hits.saturating_sub(last.device.hits));
        self.cache_lookups
            .get_or_create(&lookup(LookupResult::miss))
            .inc_by(now.device.misses.saturating_sub(last.device.misses));
        self.bytes_read
            .get_or_create(&SourceLabels {
                source: "pread".into(),
            })
            .inc_by(now.bytes_read.saturating_sub(last.bytes_read));
    }

    /// Sets the bytes of routed experts resident in the host tier, summed over the models.
    pub fn set_resident_bytes(&self, resident_bytes: u64) {
        self.resident_bytes
            .get_or_create(&TierLabels { tier: Tier::host })
            .set(i64::try_from(resident_bytes).unwrap_or(i64::MAX));
    }
}
