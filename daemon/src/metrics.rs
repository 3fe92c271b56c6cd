//! Prometheus metrics (CONVENTIONS.md: `tileflow_` prefix, base units, `_total` counters, no
//! per-request labels). Counters and gauges are atomics: the engine thread updates them
//! without sharing a lock with the API.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

use tileflow_engine::tier::TierStats;

/// Labels of `tileflow_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Model name.
    pub model: String,
    /// "stop", "length", "error", "cancelled", "timeout".
    pub finish_reason: String,
}

/// The expert tier a lookup asked or a resident byte lives in.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Tier {
    /// The device tier (the backend's memory: VRAM on CUDA, RAM on the CPU backend).
    device,
    /// The page-locked host tier between storage and the device tier.
    host,
}

/// What became of a prefetched expert.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum PrefetchOutcome {
    /// Resident when the forward pass asked for it.
    used,
    /// Evicted or dropped before anyone asked for it.
    wasted,
    /// Asked for while its read was still in flight.
    late,
}

/// Labels of `tileflow_prefetch_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PrefetchLabels {
    /// The outcome.
    pub outcome: PrefetchOutcome,
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
    /// The storage backend ("io_uring", "pread").
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
    /// Expert slots in use, in bytes, per tier (summed over models).
    pub resident_bytes: Family<TierLabels, Gauge>,
    /// Bytes copied host → device.
    pub h2d_bytes: Counter,
    /// Routed experts run, by the tier they ran from: the device tier (by the backend) or
    /// the host tier (by the CPU kernels, hybrid execution).
    pub experts_run: Family<TierLabels, Counter>,
    /// Weight bytes of the routed experts run, by tier.
    pub expert_run_bytes: Family<TierLabels, Counter>,
    /// Prefetched experts by outcome.
    pub prefetch: Family<PrefetchLabels, Counter>,
    /// Each wait of the forward pass for an expert.
    pub expert_stall: Histogram,
    /// Expert reads whose checksum did not match.
    pub checksum_failures: Counter,
    /// Expert reads that failed.
    pub read_failures: Counter,
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
            h2d_bytes: Counter::default(),
            experts_run: Family::default(),
            expert_run_bytes: Family::default(),
            prefetch: Family::default(),
            // 100µs × 2^k: up to 13s in 18 buckets, then +Inf.
            expert_stall: Histogram::new(exponential_buckets(1e-4, 2.0, 18)),
            checksum_failures: Counter::default(),
            read_failures: Counter::default(),
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
        // Named in full, like tile_bytes_read: `tileflow_h2d_bytes_total`.
        r.register(
            "h2d_bytes",
            "Routed-expert bytes copied from the host tier to the device tier",
            m.h2d_bytes.clone(),
        );
        r.register(
            "experts_run",
            "Routed experts run, by the tier they ran from: device (the backend) or host (the \
             CPU, hybrid execution)",
            m.experts_run.clone(),
        );
        // Named in full, like h2d_bytes.
        r.register(
            "expert_run_bytes",
            "Weight bytes of the routed experts run, by the tier they ran from",
            m.expert_run_bytes.clone(),
        );
        r.register(
            "prefetch",
            "Prefetched routed experts by outcome: used, wasted (evicted unused) or late",
            m.prefetch.clone(),
        );
        r.register_with_unit(
            "expert_stall",
            "Time the forward pass waited for routed experts to become resident",
            prometheus_client::registry::Unit::Seconds,
            m.expert_stall.clone(),
        );
        r.register(
            "tile_checksum_failures",
            "Routed-expert reads whose checksum did not match the manifest",
            m.checksum_failures.clone(),
        );
        r.register(
            "tile_read_failures",
            "Routed-expert reads that failed (I/O errors, short files)",
            m.read_failures.clone(),
        );
        // Families whose label values are known: every series from the first scrape.
        for tier in [Tier::device, Tier::host] {
            for result in [LookupResult::hit, LookupResult::miss] {
                let _ = m
                    .cache_lookups
                    .get_or_create(&LookupLabels { tier, result });
            }
            let _ = m.resident_bytes.get_or_create(&TierLabels { tier });
            let _ = m.experts_run.get_or_create(&TierLabels { tier });
            let _ = m.expert_run_bytes.get_or_create(&TierLabels { tier });
        }
        for outcome in [
            PrefetchOutcome::used,
            PrefetchOutcome::wasted,
            PrefetchOutcome::late,
        ] {
            let _ = m.prefetch.get_or_create(&PrefetchLabels { outcome });
        }
        m
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Adds one model's expert tier progress since `last` (counters only move forward: a
    /// counter that went down, as after a reload of the model, adds nothing).
    pub fn record_cache(&self, last: &TierStats, now: &TierStats) {
        let lookups = [
            (Tier::device, last.device, now.device),
            (Tier::host, last.host, now.host),
        ];
        for (tier, before, after) in lookups {
            for (result, b, a) in [
                (LookupResult::hit, before.hits, after.hits),
                (LookupResult::miss, before.misses, after.misses),
            ] {
                self.cache_lookups
                    .get_or_create(&LookupLabels { tier, result })
                    .inc_by(a.saturating_sub(b));
            }
        }
        let read = now.bytes_read.saturating_sub(last.bytes_read);
        if read > 0 {
            let source = if now.source.is_empty() {
                "unknown"
            } else {
                now.source
            };
            self.bytes_read
                .get_or_create(&SourceLabels {
                    source: source.into(),
                })
                .inc_by(read);
        }
        self.h2d_bytes
            .inc_by(now.h2d_bytes.saturating_sub(last.h2d_bytes));
        for (tier, before, after) in [
            (Tier::device, last.ran_device, now.ran_device),
            (Tier::host, last.ran_host, now.ran_host),
        ] {
            let labels = TierLabels { tier };
            self.experts_run
                .get_or_create(&labels)
                .inc_by(after.experts.saturating_sub(before.experts));
            self.expert_run_bytes
                .get_or_create(&labels)
                .inc_by(after.bytes.saturating_sub(before.bytes));
        }
        let (b, a) = (last.prefetch, now.prefetch);
        for (outcome, before, after) in [
            (PrefetchOutcome::used, b.used, a.used),
            (PrefetchOutcome::wasted, b.wasted, a.wasted),
            (PrefetchOutcome::late, b.late, a.late),
        ] {
            self.prefetch
                .get_or_create(&PrefetchLabels { outcome })
                .inc_by(after.saturating_sub(before));
        }
        self.checksum_failures
            .inc_by(now.checksum_failures.saturating_sub(last.checksum_failures));
        self.read_failures
            .inc_by(now.read_failures.saturating_sub(last.read_failures));
    }

    /// Observes expert stall events (one per wait).
    pub fn observe_stalls(&self, stalls: &[Duration]) {
        for stall in stalls {
            self.expert_stall.observe(stall.as_secs_f64());
        }
    }

    /// Sets the bytes of routed experts resident per tier, each summed over the models.
    pub fn set_resident_bytes(&self, device: u64, host: u64) {
        for (tier, bytes) in [(Tier::device, device), (Tier::host, host)] {
            self.resident_bytes
                .get_or_create(&TierLabels { tier })
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_families_encode_with_their_labels() {
        let m = Metrics::new();
        let mut now = TierStats {
            source: "io_uring",
            bytes_read: 8192,
            h2d_bytes: 4096,
            checksum_failures: 1,
            ..TierStats::default()
        };
        now.device.misses = 2;
        now.host.hits = 1;
        now.prefetch.wasted = 3;
        now.ran_host.experts = 2;
        now.ran_host.bytes = 6000;
        m.record_cache(&TierStats::default(), &now);
        m.observe_stalls(&[Duration::from_micros(150)]);
        m.set_resident_bytes(4096, 0);
        let text = m.encode();
        for line in [
            "tileflow_tile_cache_lookups_total{tier=\"device\",result=\"miss\"} 2",
            "tileflow_tile_cache_lookups_total{tier=\"host\",result=\"hit\"} 1",
            "tileflow_tile_bytes_read_total{source=\"io_uring\"} 8192",
            "tileflow_h2d_bytes_total 4096",
            "tileflow_prefetch_total{outcome=\"wasted\"} 3",
            "tileflow_experts_run_total{tier=\"host\"} 2",
            "tileflow_experts_run_total{tier=\"device\"} 0",
            "tileflow_expert_run_bytes_total{tier=\"host\"} 6000",
            "tileflow_prefetch_total{outcome=\"late\"} 0",
            "tileflow_tile_checksum_failures_total 1",
            "tileflow_tile_read_failures_total 0",
            "tileflow_expert_stall_seconds_count 1",
            "tileflow_expert_stall_seconds_bucket{le=\"0.0002\"} 1",
            "tileflow_tile_cache_resident_bytes{tier=\"device\"} 4096",
            "tileflow_tile_cache_resident_bytes{tier=\"host\"} 0",
        ] {
            assert!(text.contains(line), "no {line:?} in:\n{text}");
        }
        // A second model's snapshot behind the first adds only its own progress.
        m.record_cache(&now, &now);
        assert!(m.encode().contains("tileflow_h2d_bytes_total 4096"));
    }
}
