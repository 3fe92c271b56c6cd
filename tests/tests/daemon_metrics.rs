//! `/metrics`: the families CONVENTIONS.md names, exact request and token accounting, and every
//! `tileflow_*` family defined moves under load; the loopback TCP listener serves the same.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::{json, Value};
use tileflow_tests::{parse_metrics, parse_response, Daemon, HttpResponse, UdsClient};

const MODEL: &str = "mixtral";

/// The families the daemon must export, with their types (CONVENTIONS.md, CPU backend).
const EXPECTED: [(&str, &str); 17] = [
    ("tileflow_requests", "counter"),
    ("tileflow_prompt_tokens", "counter"),
    ("tileflow_generation_tokens", "counter"),
    ("tileflow_requests_running", "gauge"),
    ("tileflow_requests_waiting", "gauge"),
    ("tileflow_time_to_first_token_seconds", "histogram"),
    ("tileflow_inter_token_latency_seconds", "histogram"),
    ("tileflow_e2e_request_latency_seconds", "histogram"),
    ("tileflow_queue_time_seconds", "histogram"),
    ("tileflow_tile_cache_lookups", "counter"),
    ("tileflow_tile_bytes_read", "counter"),
    ("tileflow_tile_cache_resident_bytes", "gauge"),
    ("tileflow_h2d_bytes", "counter"),
    ("tileflow_prefetch", "counter"),
    ("tileflow_expert_stall_seconds", "histogram"),
    ("tileflow_tile_checksum_failures", "counter"),
    ("tileflow_tile_read_failures", "counter"),
];

/// Families that may stay still in a healthy run: the failure counters.
const MAY_STAY_STILL: [&str; 2] = [
    "tileflow_tile_checksum_failures",
    "tileflow_tile_read_failures",
];

/// The label sets every streaming family carries from the first scrape.
const LABELLED: [&str; 9] = [
    "tileflow_tile_cache_lookups_total{tier=\"device\",result=\"hit\"}",
    "tileflow_tile_cache_lookups_total{tier=\"device\",result=\"miss\"}",
    "tileflow_tile_cache_lookups_total{tier=\"host\",result=\"hit\"}",
    "tileflow_tile_cache_lookups_total{tier=\"host\",result=\"miss\"}",
    "tileflow_tile_cache_resident_bytes{tier=\"device\"}",
    "tileflow_tile_cache_resident_bytes{tier=\"host\"}",
    "tileflow_prefetch_total{outcome=\"used\"}",
    "tileflow_prefetch_total{outcome=\"wasted\"}",
    "tileflow_prefetch_total{outcome=\"late\"}",
];

/// Metric families declared by `# TYPE` lines: name → type.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, t)| (n.to_string(), t.to_string()))
        .collect()
}

/// The value that says whether a family moved: the sum over label sets of its `_total`
/// (counter), `_count` (histogram) or plain (gauge) samples.
fn family_value(samples: &[(String, f64)], family: &str, kind: &str) -> f64 {
    let name = match kind {
        "counter" => format!("{family}_total"),
        "histogram" => format!("{family}_count"),
        _ => family.to_string(),
    };
    samples
        .iter()
        .filter(|(k, _)| k == &name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

fn sample(samples: &[(String, f64)], key: &str) -> f64 {
    samples
        .iter()
        .find(|(k, _)| k == key)
        .map_or(0.0, |(_, v)| *v)
}

fn scrape(client: &UdsClient) -> (String, Vec<(String, f64)>) {
    let r = client.get("/metrics");
    assert_eq!(r.status, 200, "{}", r.text());
    let text = r.text();
    let samples = parse_metrics(&text);
    (text, samples)
}

fn tcp_get(addr: &str, path: &str) -> HttpResponse {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    parse_response(&raw).expect("an HTTP response")
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn every_metric_moves_and_tokens_are_accounted() {
    let addr = format!("127.0.0.1:{}", free_port());
    // Two expert slots: experts are evicted and read again, so the cache metrics move. A second,
    // idle model must not hide the first one's resident bytes.
    let daemon = Daemon::builder()
        .model(MODEL)
        .model("olmoe")
        .args(&["--expert-slots", "2", "--metrics-listen", &addr])
        .start();
    let client = daemon.client();
    let r = client.get("/metrics");
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.starts_with("application/openmetrics-text")),
        "{:?}",
        r.headers
    );
    let (text, initial) = scrape(&client);
    assert!(text.ends_with("# EOF\n"), "{text}");
    let declared = families(&text);
    for (name, kind) in EXPECTED {
        assert_eq!(
            declared.get(name).map(String::as_str),
            Some(kind),
            "{name} ({kind}) is not exported:\n{text}"
        );
    }
    for name in declared.keys() {
        assert!(name.starts_with("tileflow_"), "{name}");
        assert!(!name.contains(':'), "{name}");
    }
    for series in LABELLED {
        assert!(
            initial.iter().any(|(k, _)| k == series),
            "no {series}:\n{text}"
        );
    }

    // Known work, one request at a time: exact accounting.
    let mut prompt_tokens = 0.0;
    let mut completion_tokens = 0.0;
    let mut requests = 0.0;
    for (i, stream) in [(0, false), (1, false), (2, true), (3, false)] {
        let body = json!({
            "model": MODEL,
            "prompt": vec![5 + i; 3 + i as usize],
            "max_tokens": 6 + i,
            "ignore_eos": true,
            "stream": stream,
            "stream_options": if stream { json!({"include_usage": true}) } else { Value::Null },
        });
        let usage = if stream {
            let mut s = client
                .stream_json("/v1/completions", &body)
                .expect("a stream");
            let chunks: Vec<String> = s.by_ref().collect();
            let usage = &chunks[chunks.len() - 2];
            serde_json::from_str::<Value>(usage).expect("usage chunk")["usage"].clone()
        } else {
            let r = client.post_json("/v1/completions", &body);
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["usage"].clone()
        };
        prompt_tokens += usage["prompt_tokens"].as_f64().unwrap_or_default();
        completion_tokens += usage["completion_tokens"].as_f64().unwrap_or_default();
        requests += 1.0;
    }
    let mut now = Vec::new();
    daemon.wait_until(
        "the engine has counted the tokens",
        Duration::from_secs(30),
        || {
            now = scrape(&client).1;
            sample(&now, "tileflow_generation_tokens_total") >= completion_tokens
        },
    );
    let delta = |key: &str| sample(&now, key) - sample(&initial, key);
    let label = format!("tileflow_requests_total{{model=\"{MODEL}\",finish_reason=\"length\"}}");
    assert_eq!(delta(&label), requests);
    assert_eq!(delta("tileflow_prompt_tokens_total"), prompt_tokens);
    assert_eq!(delta("tileflow_generation_tokens_total"), completion_tokens);
    for h in ["time_to_first_token", "e2e_request_latency", "queue_time"] {
        assert_eq!(
            delta(&format!("tileflow_{h}_seconds_count")),
            requests,
            "{h}: one observation per request"
        );
    }
    assert_eq!(
        delta("tileflow_inter_token_latency_seconds_count"),
        completion_tokens - requests,
        "one observation per token after the first"
    );
    // Counters agree with one another (never with a clock).
    let lookups = |tier: &str, result: &str| {
        delta(&format!(
            "tileflow_tile_cache_lookups_total{{tier=\"{tier}\",result=\"{result}\"}}"
        ))
    };
    let device_misses = lookups("device", "miss");
    assert!(
        lookups("device", "hit") + device_misses > 0.0,
        "no device lookups"
    );
    assert!(device_misses > 0.0, "two slots and no misses");
    // A host lookup happens only on a device miss.
    assert!(lookups("host", "hit") + lookups("host", "miss") <= device_misses);
    let read: f64 = now
        .iter()
        .filter(|(k, _)| k.starts_with("tileflow_tile_bytes_read_total{source=\""))
        .map(|(_, v)| v)
        .sum();
    assert!(read > 0.0, "misses but no bytes read");
    assert!(
        now.iter().any(
            |(k, v)| k.starts_with("tileflow_tile_bytes_read_total{source=")
                && *v > 0.0
                && !k.contains("source=\"\"")
        ),
        "bytes read without a backend name"
    );
    assert!(sample(&now, "tileflow_tile_cache_resident_bytes{tier=\"device\"}") > 0.0);
    let prefetched = ["used", "wasted", "late"]
        .iter()
        .map(|o| delta(&format!("tileflow_prefetch_total{{outcome=\"{o}\"}}")))
        .sum::<f64>();
    assert!(prefetched >= 0.0);
    assert_eq!(delta("tileflow_tile_checksum_failures_total"), 0.0);
    assert_eq!(delta("tileflow_tile_read_failures_total"), 0.0);
    let stall_count = delta("tileflow_expert_stall_seconds_count");
    let stall_inf = delta("tileflow_expert_stall_seconds_bucket{le=\"+Inf\"}");
    assert_eq!(stall_count, stall_inf, "the +Inf bucket counts every stall");

    // A burst larger than the running batch: the gauges must show it while it lasts.
    let mut peaks: Vec<Vec<(String, f64)>> = Vec::new();
    let gauge_moved = |snaps: &[Vec<(String, f64)>], name: &str| {
        snaps
            .iter()
            .any(|s| family_value(s, name, "gauge") != family_value(&initial, name, "gauge"))
    };
    for _attempt in 0..3 {
        let burst = 48;
        let barrier = Arc::new(Barrier::new(burst + 1));
        let busy = Arc::new(AtomicBool::new(true));
        let threads: Vec<_> = (0..burst)
            .map(|i| {
                let (client, barrier) = (client.clone(), barrier.clone());
                std::thread::spawn(move || {
                    let body = json!({
                        "model": MODEL, "prompt": [1 + i, 2, 3], "max_tokens": 200,
                        "ignore_eos": true,
                    });
                    barrier.wait();
                    client.post_json("/v1/completions", &body).status
                })
            })
            .collect();
        let poller = {
            let (client, busy) = (client.clone(), busy.clone());
            std::thread::spawn(move || {
                let mut snaps = Vec::new();
                while busy.load(Ordering::Relaxed) {
                    snaps.push(scrape(&client).1);
                }
                snaps
            })
        };
        barrier.wait();
        for t in threads {
            assert_eq!(t.join().expect("a client"), 200);
        }
        busy.store(false, Ordering::Relaxed);
        peaks.extend(poller.join().expect("the poller"));
        if gauge_moved(&peaks, "tileflow_requests_running")
            && gauge_moved(&peaks, "tileflow_requests_waiting")
        {
            break;
        }
    }
    let (text, last) = scrape(&client);
    peaks.push(last);
    let declared = families(&text);
    let dead: Vec<&String> = declared
        .iter()
        .filter(|(name, _)| !MAY_STAY_STILL.contains(&name.as_str()))
        .filter(|(name, kind)| {
            let before = family_value(&initial, name, kind);
            !peaks.iter().any(|s| family_value(s, name, kind) != before)
        })
        .map(|(name, _)| name)
        .collect();
    assert!(
        dead.is_empty(),
        "metric families that never moved: {dead:?}\n{text}"
    );

    // The loopback listener serves the same families, and nothing else.
    let tcp = tcp_get(&addr, "/metrics");
    assert_eq!(tcp.status, 200);
    assert_eq!(families(&tcp.text()), declared);
    let other = tcp_get(&addr, "/v1/models");
    assert_eq!(other.status, 404, "{}", other.text());
    assert_eq!(other.json()["error"]["type"], "not_found_error");
}
