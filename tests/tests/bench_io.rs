//! `tilectl bench io` end to end: a small sweep on a temporary file, checking the JSON report's
//! shape and byte counts (never its timings).

use tileflow_tests::tilectl_ok;

#[test]
fn bench_io_reports_every_point_with_the_bytes_asked_for() {
    let state = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let run = tilectl_ok(
        state.path(),
        &[
            "bench",
            "io",
            "--size",
            "8MiB",
            "--dir",
            &work.path().display().to_string(),
            "--tile-sizes",
            "64KiB,1MiB",
            "--queue-depths",
            "1,4",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", run.stdout));
    const ASKED: u64 = 8 << 20;
    assert_eq!(report["bytes"], ASKED);
    assert!(report["direct"].is_boolean());
    assert!(report["file"].is_string());
    assert!(report["device"].as_str().is_some_and(|d| !d.is_empty()));
    assert!(report["notes"].is_array());

    let baselines = report["baselines"].as_array().unwrap();
    let mut chunks: Vec<u64> = baselines
        .iter()
        .map(|b| b["chunk_bytes"].as_u64().unwrap())
        .collect();
    chunks.sort_unstable();
    assert_eq!(chunks, [64 << 10, 1 << 20]);
    for b in baselines {
        assert_eq!(b["bytes"], ASKED);
        assert!(b["gbps"].as_f64().unwrap() >= 0.0);
    }

    let points = report["points"].as_array().unwrap();
    assert_eq!(points.len(), 2 * 2 * 2);
    for backend in ["io_uring", "pread"] {
        for tile in [64u64 << 10, 1 << 20] {
            for depth in [1u64, 4] {
                let found = points.iter().filter(|p| {
                    p["backend"] == backend && p["tile_bytes"] == tile && p["queue_depth"] == depth
                });
                let found: Vec<_> = found.collect();
                assert_eq!(found.len(), 1, "{backend} {tile} {depth}");
                let p = found[0];
                assert_eq!(p["bytes_read"], ASKED, "{p}");
                assert_eq!(p["bytes_copied"], ASKED, "{p}");
                for key in [
                    "read_gbps",
                    "copy_gbps",
                    "end_to_end_gbps",
                    "read_vs_pread_1mib",
                    "read_vs_pread_tile",
                    "end_to_end_vs_pread_1mib",
                ] {
                    assert!(p[key].as_f64().is_some_and(|x| x >= 0.0), "{key}: {p}");
                }
            }
        }
    }
    // The temporary file is gone.
    assert_eq!(std::fs::read_dir(work.path()).unwrap().count(), 0);
}

#[test]
fn bench_io_refuses_bad_tile_sizes_and_ranges() {
    let state = tempfile::tempdir().unwrap();
    let file = tempfile::NamedTempFile::new_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(file.path(), vec![7u8; 8192]).unwrap();
    let path = file.path().display().to_string();
    let run = tileflow_tests::tilectl(
        state.path(),
        &["bench", "io", "--file", &path, "--tile-sizes", "1000"],
    );
    assert!(!run.ok);
    assert!(run.stderr.contains("1000"), "{}", run.stderr);
    let run = tileflow_tests::tilectl(
        state.path(),
        &["bench", "io", "--file", &path, "--bytes", "1MiB"],
    );
    assert!(!run.ok);
    assert!(run.stderr.contains(&path), "{}", run.stderr);
    let run = tileflow_tests::tilectl(state.path(), &["bench", "io", "no-such-model"]);
    assert!(!run.ok);
    assert!(run.stderr.contains("no-such-model"), "{}", run.stderr);
}
