//! `tilectl bench stream` on a tiny synthetic model: one run per prefetch depth, with the
//! fields the benchmark promises (structure only: no numbers are asserted, speed lives in
//! benchmarks). Also `--device` of the in-process commands (`bench stream`, `run --offline`).

use serde_json::Value;
use tileflow_tests::{tilectl, tilectl_ok};

#[test]
fn bench_stream_reports_every_depth_as_json() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    tilectl_ok(
        s,
        &[
            "model",
            "synth",
            "--preset",
            "tiny",
            "--name",
            "tiny",
            "--route-skew",
            "1",
        ],
    );
    let run = tilectl_ok(
        s,
        &[
            "bench",
            "stream",
            "tiny",
            "--tokens",
            "3",
            "--batch",
            "2",
            "--expert-slots",
            "8",
            "--prefetch-depths",
            "0,1,2",
            "--device",
            "cpu",
            "--json",
        ],
    );
    let report: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stdout));
    assert_eq!(report["model"], "tiny");
    assert_eq!(report["backend"], "cpu");
    assert_eq!(report["batch"], 2);
    assert_eq!(report["expert_slots"], 8);
    let runs = report["runs"].as_array().unwrap();
    let depths: Vec<u64> = runs
        .iter()
        .map(|r| r["prefetch_depth"].as_u64().unwrap())
        .collect();
    assert_eq!(depths, vec![0, 1, 2]);
    for r in runs {
        assert_eq!(r["tokens"], 6, "{r}");
        for field in [
            "seconds",
            "tokens_per_s",
            "decode_tokens_per_s",
            "stall_s_per_token",
            "bytes_read_per_token",
        ] {
            assert!(r[field].as_f64().is_some(), "{field}: {r}");
        }
        for field in [
            "prefetch_issued",
            "prefetch_used",
            "prefetch_wasted",
            "prefetch_late",
            "bytes_read",
            "device_hits",
            "device_misses",
        ] {
            assert!(r[field].as_u64().is_some(), "{field}: {r}");
        }
        assert!(r.get("stall_ratio_vs_depth0").is_some(), "{r}");
        let recall = &r["recall"];
        if r["prefetch_depth"] == 0 {
            assert!(recall.is_null(), "{r}");
        } else {
            let x = recall.as_f64().unwrap_or_else(|| panic!("no recall: {r}"));
            assert!((0.0..=1.0).contains(&x), "{r}");
        }
    }
}

/// A warm cache with room for every expert reads nothing during the run, and prompts of a
/// given length are what prefill sees.
#[test]
fn bench_stream_warm_prompt_length_and_repeats() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    tilectl_ok(s, &["model", "synth", "--preset", "tiny", "--name", "tiny"]);
    let run = tilectl_ok(
        s,
        &[
            "bench",
            "stream",
            "tiny",
            "--tokens",
            "4",
            "--prompt-tokens",
            "32",
            "--prefetch-depths",
            "0",
            "--warm",
            "--repeats",
            "3",
            "--json",
        ],
    );
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    let r = &report["runs"][0];
    // Three generations of 4 tokens; the speed reported is the best of the three.
    assert_eq!(r["tokens"], 12, "{r}");
    let repeats: Vec<f64> = r["decode_tokens_per_s_repeats"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(repeats.len(), 3, "{r}");
    let best = repeats.iter().copied().fold(0.0, f64::max);
    assert_eq!(r["decode_tokens_per_s"].as_f64().unwrap(), best, "{r}");
    assert_eq!(r["prompt_tokens"], 32, "{r}");
    assert_eq!(r["bytes_read"], 0, "a warm, all-resident cache read: {r}");
    assert_eq!(r["h2d_bytes_per_token"], 0.0, "{r}");
    assert_eq!(r["device_misses"], 0, "{r}");
}

#[test]
fn in_process_commands_run_on_the_device_asked_for() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    tilectl_ok(s, &["model", "synth", "--preset", "tiny", "--name", "tiny"]);
    let run = &["run", "tiny", "-p", "hello", "--max-tokens", "2"];
    for device in [&["--device", "cpu"][..], &[][..]] {
        let ran = tilectl_ok(s, &[&run[..], device].concat());
        assert!(
            ran.stderr.contains("tokens/s (cpu)"),
            "{device:?}: {}",
            ran.stderr
        );
    }
    // The binaries under test are built without the `cuda` feature.
    let bench = &[
        "bench",
        "stream",
        "tiny",
        "--tokens",
        "1",
        "--prefetch-depths",
        "0",
    ];
    for (args, device) in [(&run[..], "cuda"), (&bench[..], "cuda:1")] {
        let refused = tilectl(s, &[args, &["--device", device]].concat());
        assert!(!refused.ok, "{args:?} --device {device} succeeded");
        for needle in [
            &format!("--device {device} cannot be used"),
            "this build has no CUDA backend",
        ] {
            assert!(
                refused.stderr.contains(needle),
                "{args:?}: {}",
                refused.stderr
            );
        }
    }
    let bad = tilectl(s, &[&bench[..], &["--device", "tpu"]].concat());
    assert!(
        !bad.ok && bad.stderr.contains("\"tpu\" is not a device"),
        "{}",
        bad.stderr
    );
}
