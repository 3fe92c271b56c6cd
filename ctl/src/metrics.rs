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
    expert_cache_hits: u64,
    expert_cache_misses: u64,
    expert_cache_hit_ratio: Option<f64>,
    expert_bytes_read: u64,
    expert_resident_bytes: u64,
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
        match s.label("result") {
            Some("hit") => sum.expert_cache_hits += s.value as u64,
            Some("miss") => sum.expert_cache_misses += s.value as u64,
            _ => {}
        }
    }
    let lookups = sum.expert_cache_hits + sum.expert_cache_misses;
    sum.expert_cache_hit_ratio =
        (lookups > 0).then(|| sum.expert_cache_hits as f64 / lookups as f64);
    sum.expert_bytes_read = family(samples, "tileflow_tile_bytes_read", "_total")
        .map(|s| s.value as u64)
        .sum();
    sum.expert_resident_bytes = family(samples, "tileflow_tile_cache_resident", "bytes")
        .map(|s| s.value as u64)
        .sum();
    sum
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
    rows.push((
        "expert cache",
        match sum.expert_cache_hit_ratio {
            Some(r) => format!(
                "hit ratio {:.1}% ({} hits, {} misses)",
                100.0 * r,
                sum.expert_cache_hits,
                sum.expert_cache_misses
            ),
            None => "no lookups yet".into(),
        },
    ));
    rows.push((
        "expert bytes",
        format!(
            "{} read, {} resident",
            human_bytes(sum.expert_bytes_read),
            human_bytes(sum.expert_resident_bytes)
        ),
    ));
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
tileflow_tile_cache_lookups_total{tier="host",result="hit"} 30
tileflow_tile_cache_lookups_total{tier="host",result="miss"} 10
tileflow_tile_bytes_read_bytes_total{source="pread"} 4096
# EOF
"#;

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
