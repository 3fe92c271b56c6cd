//! The CPU engine against Hugging Face transformers' golden greedy continuations, through the
//! real pack path (import → store → tier cache over experts.tiles), with every slot budget and
//! with all prompts batched.

use tileflow_engine::model::{LoadOptions, LoadedModel};
use tileflow_engine::store::Store;
use tileflow_tests::golden;
use tileflow_tests::greedy::{check_golden, greedy_batch, import_fixture, prompt_ids};
use tileflow_tests::FAMILIES;

#[test]
fn cpu_engine_matches_transformers_alone_batched_and_streaming() {
    let state = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        import_fixture(state.path(), family);
        let g = golden(family);
        let cases = g["cases"].as_array().unwrap();
        let prompts: Vec<Vec<u32>> = cases.iter().map(prompt_ids).collect();
        let steps = cases[0]["max_new_tokens"].as_u64().unwrap() as usize;
        let store = Store::new(state.path());

        let mut all = LoadedModel::open(&store, family, &LoadOptions::default()).unwrap();
        let mut alone = Vec::new();
        let mut worst = 0f32;
        for (case, p) in cases.iter().zip(&prompts) {
            let got = greedy_batch(&mut all.runner, std::slice::from_ref(p), steps).remove(0);
            worst = worst.max(check_golden(family, case, &got, 1e-4));
            alone.push(got);
        }
        // All prompts at once: each the same as alone.
        let batched = greedy_batch(&mut all.runner, &prompts, steps);
        for (case, got) in cases.iter().zip(&batched) {
            check_golden(family, case, got, 1e-4);
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
