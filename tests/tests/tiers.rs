//! Expert tiers do not change numbers: on every golden fixture, greedy tokens and logprobs are
//! bit-identical whether all experts are resident or streamed through small device tiers, with
//! or without a host tier, under either eviction policy, with 4 KiB tiles, and with either
//! storage backend.

use std::path::Path;

use tileflow_engine::forward::SeqChunk;
use tileflow_engine::model::{LoadOptions, LoadedModel};
use tileflow_engine::pack::import::CheckpointSource;
use tileflow_engine::pack::manifest::align_up;
use tileflow_engine::pack::write::write_pack;
use tileflow_engine::store::Store;
use tileflow_engine::tier::{EvictionPolicy, TierConfig};
use tileflow_spdk::BackendChoice;
use tileflow_tests::engine_help::log_softmax;
use tileflow_tests::{fixture, FAMILIES};

/// Greedy tokens and the bits of each step's full log-softmax row.
#[derive(Debug, PartialEq)]
struct Run {
    tokens: Vec<u32>,
    logprob_bits: Vec<Vec<u32>>,
}

fn greedy(model: &mut LoadedModel, prompt: &[u32], steps: usize) -> Run {
    let runner = &mut model.runner;
    runner.add_sequence(0).unwrap();
    let mut seq = prompt.to_vec();
    let mut start = 0;
    let mut run = Run {
        tokens: vec![],
        logprob_bits: vec![],
    };
    for _ in 0..steps {
        let logits = runner
            .step(&[SeqChunk::new(0, &seq[start..], start)])
            .unwrap();
        let lp = log_softmax(&logits[0]);
        let mut best = 0;
        for (i, &x) in lp.iter().enumerate() {
            if x > lp[best] {
                best = i;
            }
        }
        start = seq.len();
        seq.push(best as u32);
        run.tokens.push(best as u32);
        run.logprob_bits
            .push(lp.iter().map(|x| x.to_bits()).collect());
    }
    runner.free_sequence(0).unwrap();
    run
}

fn import(state: &Path, family: &str) {
    let store = Store::new(state);
    let source = CheckpointSource::open(&fixture(family)).unwrap();
    let txn = store.begin(family).unwrap();
    write_pack(&source, family, txn.dir(), &|_| {}).unwrap();
    txn.commit().unwrap();
}

fn prompts(family: &str) -> (Vec<Vec<u32>>, usize) {
    let g: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture(family).join("golden.json")).unwrap())
            .unwrap();
    let cases = g["cases"].as_array().unwrap();
    let steps = cases[0]["max_new_tokens"].as_u64().unwrap() as usize;
    let prompts = cases
        .iter()
        .map(|c| {
            c["prompt_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect()
        })
        .collect();
    (prompts, steps)
}

#[test]
fn tiers_give_bit_identical_results() {
    let state = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        import(state.path(), family);
        let store = Store::new(state.path());
        let (prompts, steps) = prompts(family);
        let mut all = LoadedModel::open(&store, family, &LoadOptions::default()).unwrap();
        let want: Vec<Run> = prompts.iter().map(|p| greedy(&mut all, p, steps)).collect();
        let top_k = all.manifest.spec.moe.top_k;
        let slot = all
            .manifest
            .experts
            .iter()
            .map(|e| align_up(e.bytes))
            .max()
            .unwrap();
        let pread = |mut t: TierConfig| {
            t.io.backend = BackendChoice::Pread;
            t
        };
        let small = TierConfig {
            device_slots: Some(top_k),
            host_bytes: 0,
            ..TierConfig::default()
        };
        let cases: Vec<(&str, TierConfig)> = vec![
            ("top-k device slots, no host tier", pread(small.clone())),
            (
                "top-k device slots, host tier of 3 experts",
                pread(TierConfig {
                    host_bytes: 3 * slot,
                    ..small.clone()
                }),
            ),
            (
                "top-k device slots, host tier of every expert",
                pread(TierConfig {
                    host_bytes: all.manifest.experts.len() as u64 * slot,
                    ..small.clone()
                }),
            ),
            (
                "lfru, top-k + 1 device slots, host tier of 2",
                pread(TierConfig {
                    device_slots: Some(top_k + 1),
                    host_bytes: 2 * slot,
                    policy: EvictionPolicy::Lfru,
                    ..small.clone()
                }),
            ),
            (
                "4 KiB tiles",
                pread(TierConfig {
                    tile_size: 4096,
                    ..small.clone()
                }),
            ),
            ("auto backend", small.clone()),
            (
                "prefetch off",
                pread(TierConfig {
                    prefetch_depth: 0,
                    ..small.clone()
                }),
            ),
            (
                "prefetch depth 2, 3 × top-k device slots, host tier of 2",
                TierConfig {
                    device_slots: Some(3 * top_k),
                    host_bytes: 2 * slot,
                    prefetch_depth: 2,
                    ..small.clone()
                },
            ),
            (
                "prefetch paced to 1 MB/s with a one-expert burst, lfru",
                TierConfig {
                    device_slots: Some(2 * top_k),
                    prefetch_depth: 1,
                    prefetch_rate_bytes: 1_000_000,
                    prefetch_burst_bytes: slot,
                    policy: EvictionPolicy::Lfru,
                    ..small.clone()
                },
            ),
        ];
        for (what, tier) in cases {
            let options = LoadOptions {
                tier,
                ..LoadOptions::default()
            };
            let mut model = LoadedModel::open(&store, family, &options).unwrap();
            for (p, w) in prompts.iter().zip(&want) {
                let got = greedy(&mut model, p, steps);
                assert!(&got == w, "{family}: {what} changed the result");
            }
            let stats = model.runner.experts().stats();
            assert!(
                stats.device_evictions > 0 && stats.bytes_read > 0,
                "{family}: {what} did not stream: {stats:?}"
            );
            assert_eq!(stats.checksum_failures + stats.read_failures, 0);
            let depth = options.tier.prefetch_depth;
            if depth == 0 {
                assert_eq!(stats.prefetch.issued, 0, "{family}: {what}: {stats:?}");
            } else if options.tier.device_slots > Some(top_k) {
                // With room beyond one layer's top-k the look-ahead hints turn into fetches.
                assert!(stats.prefetch.issued > 0, "{family}: {what}: {stats:?}");
            }
            if stats.host_resident_experts == all.manifest.experts.len() {
                // Each expert was read from storage once; every later miss was a host hit.
                assert!(stats.host.hits > 0, "{family}: {what}: {stats:?}");
                assert_eq!(stats.host_evictions, 0);
                // (Prefetched experts enter the host tier without a host lookup.)
                assert!(stats.host.misses <= stats.host_resident_experts as u64);
            }
            eprintln!("{family}: {what}: {stats:?}");
        }
    }
}
