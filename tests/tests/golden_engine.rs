//! The CPU engine against Hugging Face transformers' golden greedy continuations, through the
//! real pack path (import → store → tier cache over experts.tiles), with every slot budget and
//! with all prompts batched.

use tileflow_engine::model::{LoadOptions, LoadedModel};
use tileflow_engine::store::Store;
use tileflow_tests::greedy::{greedy_batch, import_fixture};
use tileflow_tests::{golden_cases, FAMILIES, LOGPROB_TOLERANCE};

#[test]
fn cpu_engine_matches_transformers_alone_batched_and_streaming() {
    let state = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        import_fixture(state.path(), family);
        let cases = golden_cases(family);
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
        let steps = cases[0].continuation.tokens.len();
        let store = Store::new(state.path());

        let mut all = LoadedModel::open(&store, family, &LoadOptions::default()).unwrap();
        let mut alone = Vec::new();
        let mut worst = 0f64;
        for (i, (case, p)) in cases.iter().zip(&prompts).enumerate() {
            let got = greedy_batch(&mut all.runner, std::slice::from_ref(p), steps).remove(0);
            let what = format!("{family} case {i} alone");
            worst = worst.max(got.assert_within(&case.continuation, &what, LOGPROB_TOLERANCE));
            alone.push(got);
        }
        // All prompts at once: each the same as alone.
        let batched = greedy_batch(&mut all.runner, &prompts, steps);
        for (i, (case, got)) in cases.iter().zip(&batched).enumerate() {
            got.assert_matches(&case.continuation, &format!("{family} case {i} batched"));
        }
        // The minimal slot budget (one layer's top-k) streams experts from experts.tiles and
        // must give bit-identical results.
        let top_k = all.manifest.spec.moe.top_k;
        let mut options = LoadOptions::default();
        options.tier.device_slots = Some(top_k);
        let mut small = LoadedModel::open(&store, family, &options).unwrap();
        for (p, want) in prompts.iter().zip(&alone) {
            let got = greedy_batch(&mut small.runner, std::slice::from_ref(p), steps).remove(0);
            assert_eq!(
                &got, want,
                "{family}: slot budget {top_k} changed the result"
            );
        }
        let stats = small.runner.experts().stats();
        assert!(
            stats.device_evictions > 0,
            "{family}: the small budget never evicted: {stats:?}"
        );
        eprintln!("{family}: max |Δlogprob| {worst:.2e}; streaming run {stats:?}");
    }
}
