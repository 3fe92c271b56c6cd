//! The expert tiers through the daemon: `[cache]` keys from the environment and flags reach the
//! loaded models, `/api/cache` reports each model's tiers and counters, `tilectl metrics`
//! summarizes the streaming families; and damaged packs fail only the requests that need the
//! damaged expert, with errors that say where, while the daemon keeps serving.
//!
//! The two damage tests need the tier rewrite (per-read failure counters) and per-request
//! failure isolation in the scheduler; until those are merged some of their assertions fail
//! (see each test).

use std::fs::OpenOptions;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tileflow_tests::{bin, fixture, parse_metrics, tilectl_ok, Daemon, HttpResponse, Run};

/// Runs `tilectl --socket SOCKET ARGS…` against `d` and panics with its output if it failed.
fn tilectl_remote(d: &Daemon, args: &[&str]) -> Run {
    let run: Run = std::process::Command::new(bin("tilectl"))
        .arg("--socket")
        .arg(d.socket())
        .args(args)
        .env_remove("TILEFLOW_STATE_DIR")
        .env_remove("TILEFLOW_SOCKET")
        .output()
        .unwrap_or_else(|e| panic!("cannot start tilectl: {e}"))
        .into();
    assert!(
        run.ok,
        "tilectl {args:?} failed:\n{}\n{}",
        run.stdout, run.stderr
    );
    run
}

fn completion(model: &str, i: u32) -> Value {
    json!({
        "model": model,
        "prompt": [1 + i % 50, 2 + i % 7, 3 + i % 11, 4 + i % 13],
        "max_tokens": 4,
        "ignore_eos": true,
    })
}

fn cache_of(d: &Daemon, model: &str) -> Value {
    let r = d.client().get("/api/cache");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["models"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["model"] == model).cloned())
        .unwrap_or_else(|| panic!("{model} is not in /api/cache: {}", r.text()))
}

fn metric(d: &Daemon, key: &str) -> f64 {
    let text = d.client().get("/metrics").text();
    parse_metrics(&text)
        .into_iter()
        .find(|(k, _)| k == key)
        .map_or(0.0, |(_, v)| v)
}

#[test]
fn api_cache_and_tilectl_metrics_report_the_tiers() {
    // The budget from the environment (TILEFLOW_CACHE__EXPERT_SLOTS) and flags for the rest.
    let d = Daemon::builder()
        .model("mixtral")
        .env("TILEFLOW_CACHE__EXPERT_SLOTS", "2")
        .env("TILEFLOW_CACHE__HOST_BYTES", "0")
        .args(&["--device-bytes", "64MiB", "--prefetch-depth", "2"])
        .start();
    for i in 0..3 {
        let r = d
            .client()
            .post_json("/v1/completions", &completion("mixtral", i));
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let m = cache_of(&d, "mixtral");
    assert_eq!(m["policy"], "lru", "{m}");
    assert_eq!(m["tile_size"], 1 << 20, "{m}");
    assert_eq!(m["prefetch_depth"], 2, "{m}");
    assert!(
        matches!(
            m["storage"]["backend"].as_str(),
            Some("io_uring" | "pread" | "auto")
        ),
        "{m}"
    );
    assert!(m["storage"]["direct"].is_boolean(), "{m}");
    let tiers = m["tiers"].as_array().expect("tiers");
    let names: Vec<&str> = tiers.iter().filter_map(|t| t["tier"].as_str()).collect();
    assert_eq!(names, ["device", "host"], "{m}");
    let device = &tiers[0];
    for key in [
        "slots",
        "slot_bytes",
        "budget_bytes",
        "resident_bytes",
        "resident_experts",
        "hits",
        "misses",
        "evictions",
    ] {
        assert!(device[key].is_u64(), "device.{key}: {m}");
    }
    assert_eq!(
        device["slots"], 2,
        "expert_slots overrides device_bytes: {m}"
    );
    let (hits, misses) = (
        device["hits"].as_u64().unwrap_or(0),
        device["misses"].as_u64().unwrap_or(0),
    );
    assert!(hits + misses > 0, "{m}");
    assert!(misses > 0 && m["bytes_read"].as_u64() > Some(0), "{m}");
    assert!(device["resident_experts"].as_u64() <= Some(2), "{m}");
    assert!(device["resident_bytes"].as_u64() > Some(0), "{m}");
    assert_eq!(tiers[1]["budget_bytes"], 0, "no host tier: {m}");
    for key in ["issued", "used", "wasted", "late"] {
        assert!(m["prefetch"][key].is_u64(), "prefetch.{key}: {m}");
    }
    assert!(m["stall_seconds"].as_f64() >= Some(0.0), "{m}");
    assert_eq!(m["checksum_failures"], 0, "{m}");
    assert_eq!(m["read_failures"], 0, "{m}");

    // tilectl metrics against the daemon: the same counters, as JSON and as a table.
    let run = tilectl_remote(&d, &["metrics", "--json"]);
    let sum: Value = serde_json::from_str(&run.stdout).expect("JSON");
    let tier = &sum["tiers"]["device"];
    let lookups = tier["hits"].as_u64().unwrap_or(0) + tier["misses"].as_u64().unwrap_or(0);
    assert!(lookups >= hits + misses, "{sum}");
    assert!(sum["expert_bytes_read"].as_u64() > Some(0), "{sum}");
    assert!(
        sum["bytes_read_by_source"]
            .as_object()
            .is_some_and(|o| !o.is_empty()),
        "{sum}"
    );
    assert_eq!(sum["checksum_failures"], 0, "{sum}");
    for key in ["used", "wasted", "late"] {
        assert!(sum["prefetch"][key].is_u64(), "{sum}");
    }
    let table = tilectl_remote(&d, &["metrics"]).stdout;
    for row in [
        "device tier",
        "hit ratio",
        "expert bytes",
        "prefetch",
        "expert stalls",
        "tile failures",
    ] {
        assert!(table.contains(row), "no {row:?} in:\n{table}");
    }
}

/// (layer, expert, offset, bytes) of every expert extent in a pack's manifest.
fn extents(pack: &Path) -> Vec<(u64, u64, u64, u64)> {
    let text = std::fs::read_to_string(pack.join("manifest.json")).expect("manifest.json");
    let manifest: Value = serde_json::from_str(&text).expect("manifest JSON");
    manifest["experts"]
        .as_array()
        .expect("experts")
        .iter()
        .map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
            (n("layer"), n("expert"), n("offset"), n("bytes"))
        })
        .collect()
}

/// Sends `count` different completions; returns the failed responses.
fn failures(d: &Daemon, model: &str, count: u32) -> Vec<HttpResponse> {
    (0..count)
        .map(|i| {
            d.client()
                .post_json("/v1/completions", &completion(model, i))
        })
        .filter(|r| r.status != 200)
        .collect()
}

#[test]
fn a_corrupted_expert_fails_its_requests_only() {
    let store = tempfile::tempdir().expect("a temporary directory");
    let state = store.path().join("state");
    for name in ["good", "bad"] {
        let src = fixture("mixtral");
        tilectl_ok(
            &state,
            &[
                "model",
                "import",
                src.to_str().unwrap_or_default(),
                "--name",
                name,
            ],
        );
    }
    // Flip bytes in the middle of every layer's expert 0 of `bad`: a token routes to expert 0
    // of some layer often enough that a handful of requests meet one.
    let pack = state.join("models/bad");
    let tiles = pack.join("experts.tiles");
    let mut bytes = std::fs::read(&tiles).expect("experts.tiles");
    let damaged: Vec<(u64, u64, u64)> = extents(&pack)
        .into_iter()
        .filter(|&(_, expert, _, _)| expert == 0)
        .map(|(layer, expert, offset, len)| {
            let mid = usize::try_from(offset + len / 2).unwrap_or(usize::MAX);
            for b in &mut bytes[mid..mid + 16] {
                *b ^= 0xA5;
            }
            (layer, expert, offset)
        })
        .collect();
    std::fs::write(&tiles, &bytes).expect("write experts.tiles");

    let d = Daemon::builder()
        .state_dir(&state)
        .preload("good")
        .preload("bad")
        .env("TILEFLOW_CACHE__VERIFY", "always")
        .env("TILEFLOW_CACHE__EXPERT_SLOTS", "2")
        .start();
    let failed = failures(&d, "bad", 12);
    assert!(!failed.is_empty(), "no request met a corrupted expert");
    for r in &failed {
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(r.status >= 500, "{}", r.text());
        assert!(
            message.contains("bad") && message.contains("checksum"),
            "{message}"
        );
        assert!(
            damaged.iter().any(|(layer, expert, _)| {
                message.contains(&format!("layer {layer}"))
                    && message.contains(&format!("expert {expert}"))
            }),
            "{message} names none of the damaged experts {damaged:?}"
        );
    }
    // The other copy of the same weights keeps working.
    assert!(failures(&d, "good", 6).is_empty(), "{}", d.stderr());
    // Needs the tier rewrite: the single-tier cache does not count checksum failures.
    assert!(
        metric(&d, "tileflow_tile_checksum_failures_total") > 0.0,
        "tileflow_tile_checksum_failures_total did not move"
    );
    let c = cache_of(&d, "bad");
    assert!(c["checksum_failures"].as_u64() > Some(0), "{c}");
}

#[test]
fn a_pack_truncated_under_the_daemon_fails_requests_not_the_daemon() {
    let mut d = Daemon::builder()
        .model("mixtral")
        .model("olmoe")
        .env("TILEFLOW_CACHE__EXPERT_SLOTS", "2")
        // No host tier: every device miss reads experts.tiles again. With one, the first
        // requests and their prefetches could have brought every expert into host memory before
        // the cut, and nothing would read the lost half (seen once in CI).
        .env("TILEFLOW_CACHE__HOST_BYTES", "0")
        .start();
    assert!(failures(&d, "mixtral", 2).is_empty(), "{}", d.stderr());
    let tiles = d.state_dir().join("models/mixtral/experts.tiles");
    let len = std::fs::metadata(&tiles).expect("experts.tiles").len();
    OpenOptions::new()
        .write(true)
        .open(&tiles)
        .and_then(|f| f.set_len(len / 2))
        .expect("truncate experts.tiles");
    let lost: Vec<(u64, u64, u64, u64)> = extents(&d.state_dir().join("models/mixtral"))
        .into_iter()
        .filter(|&(_, _, offset, bytes)| offset + bytes > len / 2)
        .collect();
    let failed = failures(&d, "mixtral", 12);
    assert!(
        !failed.is_empty(),
        "two slots, half the pack gone, and no failure"
    );
    for r in &failed {
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(message.contains("experts.tiles"), "no file in {message}");
        assert!(
            lost.iter().any(|(layer, expert, offset, _)| {
                message.contains(&format!("layer {layer}"))
                    && message.contains(&format!("expert {expert}"))
                    && message.contains(&format!("offset {offset}"))
            }),
            "{message} names none of the lost extents"
        );
    }
    d.assert_serving();
    assert!(failures(&d, "olmoe", 4).is_empty(), "{}", d.stderr());
    // tilectl through the daemon still lists the healthy model.
    let run = tilectl_remote(&d, &["ps"]);
    assert!(run.stdout.contains("olmoe"), "{}", run.stdout);
    // Needs the tier rewrite: the single-tier cache does not count read failures.
    d.wait_until(
        "the read failures to be counted",
        Duration::from_secs(30),
        || metric(&d, "tileflow_tile_read_failures_total") > 0.0,
    );
    d.assert_serving();
}
