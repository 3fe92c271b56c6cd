//! `tilectl metrics`: a human summary of the daemon's Prometheus text.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::output::{fields, human_bytes, human_seconds, print_json};
use crate::remote::connect;

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
    value: f64,
}

impl Sample {
    fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses the sample lines of Prometheus / OpenMetrics text; comments and lines it cannot
/// read are skipped (a summary, not a validator).
fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let close = open + line[open..].find('}')?;
            (
                &line[..open],
                parse_labels(&line[open + 1..close])?,
                &line[close + 1..],
            )
        }
        None => {
            let sp = line.find(' ')?;
            (&line[..sp], Vec::new(), &line[sp..])
        }
    };
    // The value, then an optional timestamp or exemplar.
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<Vec<(String, String)>> {
    let mut labels = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        let after = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        rest = after[end + 1..]
            .trim_start()
            .trim_start_matches(',')
            .trim_start();
    }
    Some(labels)
}

/// What `tilectl metrics` shows.
#[derive(Debug, Default, Serialize)]
struct Summary {
    requests: u64,
    requests_by_finish_reason: BTreeMap<String, u64>,
    requests_by_model: BTreeMap<String, u64>,
    requests_running: u64,
    requests_waiting: u64,
    prompt_tokens: u64,
    generation_tokens: u64,
    /// Mean seconds of each latency histogram that has observations.
    mean_seconds: BTreeMap<String, f64>,
    /// Observations of each latency histogram.
    observations: BTreeMap<String, u64>,
    /// Device-tier lookups (every lookup of the forward pass) that hit.
    expert_cache_hits: u64,
    /// Device-tier lookups that missed.
    expert_cache_misses: u64,
    expert_cache_hit_ratio: Option<f64>,
    expert_bytes_read: u64,
    /// Resident bytes over all tiers.
    expert_resident_bytes: u64,
    /// Lookups and resident bytes per tier ("device", "host").
    tiers: BTreeMap<String, TierSummary>,
    /// Bytes read from storage per backend.
    bytes_read_by_source: BTreeMap<String, u64>,
    /// Bytes copied host → device.
    h2d_bytes: u64,
    prefetch: PrefetchSummary,
    stall: StallSummary,
    checksum_failures: u64,
    read_failures: u64,
}

/// One tier's lookups and residency.
#[derive(Debug, Default, Serialize, PartialEq)]
struct TierSummary {
    hits: u64,
    misses: u64,
    hit_ratio: Option<f64>,
    resident_bytes: u64,
}

/// Prefetch outcomes, with each one's share of all outcomes.
#[derive(Debug, Default, Serialize, PartialEq)]
struct PrefetchSummary {
    used: u64,
    wasted: u64,
    late: u64,
    used_ratio: Option<f64>,
    wasted_ratio: Option<f64>,
    late_ratio: Option<f64>,
}

/// The expert stall histogram: its total and estimated quantiles.
#[derive(Debug, Default, Serialize, PartialEq)]
struct StallSummary {
    /// Stall observations.
    events: u64,
    total_seconds: f64,
    /// Median and 99th percentile estimated from the buckets (linear within a bucket).
    p50_seconds: Option<f64>,
    p99_seconds: Option<f64>,
}

/// The stall histogram's family name.
const STALL: &str = "tileflow_expert_stall_seconds";

/// The `q` quantile of a cumulative histogram given as (upper bound, count) pairs, the way
/// Prometheus' `histogram_quantile` estimates it: linear within the bucket that holds the rank;
/// in the +Inf bucket, the largest finite bound. `None` without observations.
fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let mut buckets = buckets.to_vec();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(upper, count) in &buckets {
        if count >= rank {
            if upper.is_infinite() {
                return Some(lower);
            }
            let in_bucket = count - below;
            let frac = if in_bucket > 0.0 {
                (rank - below) / in_bucket
            } else {
                1.0
            };
            return Some(lower + (upper - lower) * frac);
        }
        (lower, below) = (upper, count);
    }
    Some(lower)
}

fn ratio(part: u64, whole: u64) -> Option<f64> {
    (whole > 0).then(|| part as f64 / whole as f64)
}

/// The latency histograms, by their name without prefix and unit, and how to show them.
const LATENCIES: [(&str, &str); 4] = [
    ("time_to_first_token", "time to first token"),
    ("inter_token_latency", "inter-token latency"),
    ("e2e_request_latency", "end-to-end latency"),
    ("queue_time", "queue time"),
];

/// The samples whose name starts with `prefix` and ends with `suffix` (a metric family whose
/// unit suffix may vary).
fn family<'a>(
    samples: &'a [Sample],
    prefix: &'a str,
    suffix: &'a str,
) -> impl Iterator<Item = &'a Sample> + 'a {
    samples
        .iter()
        .filter(move |s| s.name.starts_with(prefix) && s.name.ends_with(suffix))
}

fn summarize(samples: &[Sample]) -> Summary {
    let total = |name: &str| -> f64 {
        samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    };
    let mut sum = Summary::default();
    for s in samples
        .iter()
        .filter(|s| s.name == "tileflow_requests_total")
    {
        let n = s.value as u64;
        sum.requests += n;
        let reason = s.label("finish_reason").unwrap_or("?").to_string();
        *sum.requests_by_finish_reason.entry(reason).or_default() += n;
        let model = s.label("model").unwrap_or("?").to_string();
        *sum.requests_by_model.entry(model).or_default() += n;
    }
    sum.requests_running = total("tileflow_requests_running") as u64;
    sum.requests_waiting = total("tileflow_requests_waiting") as u64;
    sum.prompt_tokens = total("tileflow_prompt_tokens_total") as u64;
    sum.generation_tokens = total("tileflow_generation_tokens_total") as u64;
    for (name, _) in LATENCIES {
        let base = format!("tileflow_{name}_seconds");
        let count = total(&format!("{base}_count"));
        if count > 0.0 {
            sum.mean_seconds
                .insert(name.into(), total(&format!("{base}_sum")) / count);
        }
        sum.observations.insert(name.into(), count as u64);
    }
    for s in family(samples, "tileflow_tile_cache_lookups", "_total") {
        let tier = sum
            .tiers
            .entry(s.label("tier").unwrap_or("?").to_string())
            .or_default();
        match s.label("result") {
            Some("hit") => tier.hits += s.value as u64,
            Some("miss") => tier.misses += s.value as u64,
            _ => {}
        }
    }
    for s in family(samples, "tileflow_tile_cache_resident", "bytes") {
        let tier = s.label("tier").unwrap_or("?").to_string();
        sum.tiers.entry(tier).or_default().resident_bytes += s.value as u64;
        sum.expert_resident_bytes += s.value as u64;
    }
    for t in sum.tiers.values_mut() {
        t.hit_ratio = ratio(t.hits, t.hits + t.misses);
    }
    if let Some(device) = sum.tiers.get("device") {
        sum.expert_cache_hits = device.hits;
        sum.expert_cache_misses = device.misses;
    }
    sum.expert_cache_hit_ratio = ratio(
        sum.expert_cache_hits,
        sum.expert_cache_hits + sum.expert_cache_misses,
    );
    for s in family(samples, "tileflow_tile_bytes_read", "_total") {
        let source = s.label("source").unwrap_or("?").to_string();
        *sum.bytes_read_by_source.entry(source).or_default() += s.value as u64;
        sum.expert_bytes_read += s.value as u64;
    }
    sum.h2d_bytes = total("tileflow_h2d_bytes_total") as u64;
    let p = &mut sum.prefetch;
    for s in samples
        .iter()
        .filter(|s| s.name == "tileflow_prefetch_total")
    {
        match s.label("outcome") {
            Some("used") => p.used += s.value as u64,
            Some("wasted") => p.wasted += s.value as u64,
            Some("late") => p.late += s.value as u64,
            _ => {}
        }
    }
    let outcomes = p.used + p.wasted + p.late;
    p.used_ratio = ratio(p.used, outcomes);
    p.wasted_ratio = ratio(p.wasted, outcomes);
    p.late_ratio = ratio(p.late, outcomes);
    let buckets: Vec<(f64, f64)> = samples
        .iter()
        .filter(|s| s.name == format!("{STALL}_bucket"))
        .filter_map(|s| {
            let le = s.label("le")?;
            let bound = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((bound, s.value))
        })
        .collect();
    sum.stall = StallSummary {
        events: total(&format!("{STALL}_count")) as u64,
        total_seconds: total(&format!("{STALL}_sum")),
        p50_seconds: quantile(0.5, &buckets),
        p99_seconds: quantile(0.99, &buckets),
    };
    sum.checksum_failures = total("tileflow_tile_checksum_failures_total") as u64;
    sum.read_failures = total("tileflow_tile_read_failures_total") as u64;
    sum
}

/// The table rows of the streaming metrics.
fn streaming_rows(sum: &Summary) -> Vec<(&'static str, String)> {
    let mut rows = Vec::new();
    for (tier, label) in [("device", "device tier"), ("host", "host tier")] {
        let Some(t) = sum.tiers.get(tier) else {
            continue;
        };
        let lookups = match t.hit_ratio {
            Some(r) => format!(
                "hit ratio {:.1}% ({} hits, {} misses)",
                100.0 * r,
                t.hits,
                t.misses
            ),
            None => "no lookups yet".into(),
        };
        rows.push((
            label,
            format!("{lookups}, {} resident", human_bytes(t.resident_bytes)),
        ));
    }
    let sources: Vec<String> = sum
        .bytes_read_by_source
        .iter()
        .map(|(k, v)| format!("{k} {}", human_bytes(*v)))
        .collect();
    rows.push((
        "expert bytes",
        format!(
            "{} read{}, {} host→device, {} resident",
            human_bytes(sum.expert_bytes_read),
            if sources.is_empty() {
                String::new()
            } else {
                format!(" ({})", sources.join(", "))
            },
            human_bytes(sum.h2d_bytes),
            human_bytes(sum.expert_resident_bytes)
        ),
    ));
    let p = &sum.prefetch;
    let share = |r: Option<f64>| r.map_or("-".into(), |r| format!("{:.1}%", 100.0 * r));
    rows.push((
        "prefetch",
        if p.used + p.wasted + p.late == 0 {
            "no outcomes yet".into()
        } else {
            format!(
                "used {} ({}), wasted {} ({}), late {} ({})",
                p.used,
                share(p.used_ratio),
                p.wasted,
                share(p.wasted_ratio),
                p.late,
                share(p.late_ratio)
            )
        },
    ));
    let st = &sum.stall;
    let q = |v: Option<f64>| v.map_or("-".into(), human_seconds);
    rows.push((
        "expert stalls",
        if st.events == 0 {
            "none".into()
        } else {
            format!(
                "{} over {} waits, p50 {}, p99 {}",
                human_seconds(st.total_seconds),
                st.events,
                q(st.p50_seconds),
                q(st.p99_seconds)
            )
        },
    ));
    rows.push((
        "tile failures",
        format!(
            "{} checksum, {} read",
            sum.checksum_failures, sum.read_failures
        ),
    ));
    rows
}

/// `tilectl metrics [--json | --raw]`.
pub fn show(socket: &Path, json: bool, raw: bool) -> anyhow::Result<()> {
    let text = connect(socket)?.metrics()?;
    if raw {
        print!("{text}");
        return Ok(());
    }
    let sum = summarize(&parse(&text));
    if json {
        return print_json(&sum);
    }
    let by_reason: Vec<String> = sum
        .requests_by_finish_reason
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let mut rows = vec![
        (
            "requests",
            if by_reason.is_empty() {
                sum.requests.to_string()
            } else {
                format!("{} ({})", sum.requests, by_reason.join(", "))
            },
        ),
        (
            "now",
            format!(
                "{} running, {} waiting",
                sum.requests_running, sum.requests_waiting
            ),
        ),
        ("prompt tokens", sum.prompt_tokens.to_string()),
        ("generated tokens", sum.generation_tokens.to_string()),
    ];
    for (name, label) in LATENCIES {
        let value = match sum.mean_seconds.get(name) {
            Some(mean) => format!(
                "mean {} over {}",
                human_seconds(*mean),
                sum.observations.get(name).copied().unwrap_or(0)
            ),
            None => "-".into(),
        };
        rows.push((label, value));
    }
    rows.extend(streaming_rows(&sum));
    fields(&rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP tileflow_requests Finished requests by model and finish reason.
# TYPE tileflow_requests counter
tileflow_requests_total{model="tiny",finish_reason="stop"} 3
tileflow_requests_total{model="tiny",finish_reason="length"} 1
tileflow_requests_total{model="a \"b\"",finish_reason="stop"} 1
tileflow_prompt_tokens_total 40
tileflow_generation_tokens_total 120
tileflow_requests_running 0
tileflow_time_to_first_token_seconds_sum 0.5
tileflow_time_to_first_token_seconds_count 5
tileflow_time_to_first_token_seconds_bucket{le="0.001"} 0
tileflow_tile_cache_lookups_total{tier="device",result="hit"} 30
tileflow_tile_cache_lookups_total{tier="device",result="miss"} 10
tileflow_tile_bytes_read_bytes_total{source="pread"} 4096
# EOF
"#;

    /// The streaming families as tileflowd encodes them.
    const STREAMING: &str = r#"# TYPE tileflow_tile_cache_lookups counter
tileflow_tile_cache_lookups_total{tier="device",result="hit"} 6
tileflow_tile_cache_lookups_total{tier="device",result="miss"} 2
tileflow_tile_cache_lookups_total{tier="host",result="hit"} 1
tileflow_tile_cache_lookups_total{tier="host",result="miss"} 1
# TYPE tileflow_tile_bytes_read counter
tileflow_tile_bytes_read_total{source="io_uring"} 8192
tileflow_tile_bytes_read_total{source="pread"} 4096
# TYPE tileflow_h2d_bytes counter
tileflow_h2d_bytes_total 2048
# TYPE tileflow_prefetch counter
tileflow_prefetch_total{outcome="used"} 6
tileflow_prefetch_total{outcome="wasted"} 3
tileflow_prefetch_total{outcome="late"} 1
# TYPE tileflow_expert_stall_seconds histogram
tileflow_expert_stall_seconds_sum 0.5
tileflow_expert_stall_seconds_count 10
tileflow_expert_stall_seconds_bucket{le="0.001"} 4
tileflow_expert_stall_seconds_bucket{le="0.002"} 6
tileflow_expert_stall_seconds_bucket{le="0.004"} 9
tileflow_expert_stall_seconds_bucket{le="+Inf"} 10
# TYPE tileflow_tile_cache_resident_bytes gauge
tileflow_tile_cache_resident_bytes{tier="device"} 4096
tileflow_tile_cache_resident_bytes{tier="host"} 1024
# TYPE tileflow_tile_checksum_failures counter
tileflow_tile_checksum_failures_total 2
# TYPE tileflow_tile_read_failures counter
tileflow_tile_read_failures_total 1
# EOF
"#;

    #[test]
    fn streaming_metrics_per_tier_source_and_outcome() {
        let sum = summarize(&parse(STREAMING));
        let device = &sum.tiers["device"];
        assert_eq!(
            (device.hits, device.misses, device.resident_bytes),
            (6, 2, 4096)
        );
        assert_eq!(device.hit_ratio, Some(0.75));
        assert_eq!(sum.tiers["host"].hit_ratio, Some(0.5));
        assert_eq!(sum.expert_cache_hit_ratio, Some(0.75));
        assert_eq!(sum.bytes_read_by_source["io_uring"], 8192);
        assert_eq!(sum.expert_bytes_read, 12288);
        assert_eq!(sum.expert_resident_bytes, 5120);
        assert_eq!(sum.h2d_bytes, 2048);
        assert_eq!(
            (sum.prefetch.used, sum.prefetch.wasted, sum.prefetch.late),
            (6, 3, 1)
        );
        assert_eq!(sum.prefetch.used_ratio, Some(0.6));
        assert_eq!((sum.checksum_failures, sum.read_failures), (2, 1));
        assert_eq!(sum.stall.events, 10);
        assert!((sum.stall.total_seconds - 0.5).abs() < 1e-12);
        // Rank 5 of 10 lies halfway through the (1ms, 2ms] bucket; rank 9.9 in +Inf.
        assert!((sum.stall.p50_seconds.unwrap() - 0.0015).abs() < 1e-12);
        assert_eq!(sum.stall.p99_seconds, Some(0.004));
        let rows = streaming_rows(&sum);
        let row = |name: &str| rows.iter().find(|(k, _)| *k == name).unwrap().1.clone();
        assert!(row("device tier").starts_with("hit ratio 75.0% (6 hits, 2 misses)"));
        assert!(row("prefetch").contains("wasted 3 (30.0%)"), "{rows:?}");
        assert!(row("expert stalls").contains("over 10 waits"), "{rows:?}");
        assert_eq!(row("tile failures"), "2 checksum, 1 read");
    }

    #[test]
    fn quantiles_need_observations() {
        assert_eq!(quantile(0.5, &[]), None);
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        let b = [(0.1, 10.0), (f64::INFINITY, 10.0)];
        assert!((quantile(0.5, &b).unwrap() - 0.05).abs() < 1e-12);
        let json = serde_json::to_value(summarize(&parse(STREAMING))).unwrap();
        assert_eq!(json["stall"]["events"], 10);
        assert_eq!(json["tiers"]["host"]["misses"], 1);
    }

    #[test]
    fn parses_labels_with_escapes() {
        let s = parse(TEXT);
        assert_eq!(s[2].label("model"), Some("a \"b\""));
        assert_eq!(s[2].label("finish_reason"), Some("stop"));
        assert_eq!(s.len(), 12);
    }

    #[test]
    fn summary_sums_families_and_means_histograms() {
        let sum = summarize(&parse(TEXT));
        assert_eq!(sum.requests, 5);
        assert_eq!(sum.requests_by_finish_reason["stop"], 4);
        assert_eq!(sum.requests_by_model["tiny"], 4);
        assert_eq!(sum.prompt_tokens, 40);
        assert_eq!(sum.generation_tokens, 120);
        assert!((sum.mean_seconds["time_to_first_token"] - 0.1).abs() < 1e-12);
        assert!(!sum.mean_seconds.contains_key("queue_time"));
        assert_eq!(sum.expert_cache_hit_ratio, Some(0.75));
        assert_eq!(sum.expert_bytes_read, 4096);
    }
}
