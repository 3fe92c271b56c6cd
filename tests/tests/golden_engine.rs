//! The CPU engine against Hugging Face transformers' golden greedy continuations, through the
//! real pack path (import → store → tier cache over experts.tiles), with every slot budget and
//! with all prompts batched.

use std::path::Path;

use serde_json::Value;
use tileflow_engine::forward::SeqChunk;
use tileflow_engine::model::{LoadOptions, LoadedModel};
use tileflow_engine::pack::import::CheckpointSource;
use tileflow_engine::pack::write::write_pack;
use tileflow_engine::store::Store;
use tileflow_tests::engine_help::{argmax, log_softmax};
use tileflow_tests::{fixture, FAMILIES};

/// What a case produced: greedy tokens and, per step, the chosen token's logprob and the top 5.
#[derive(Debug, PartialEq)]
struct Continuation {
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    top: Vec<Vec<(u32, f32)>>,
}

fn top5(lp: &[f32]) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    idx[..5].iter().map(|&i| (i as u32, lp[i])).collect()
}

/// Greedy-decodes every prompt together, one batched step at a time.
fn greedy_batch(model: &mut LoadedModel, prompts: &[Vec<u32>], steps: usize) -> Vec<Continuation> {
    let runner = &mut model.runner;
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Continuation> = prompts
        .iter()
        .map(|_| Continuation {
            tokens: vec![],
            logprobs: vec![],
            top: vec![],
        })
        .collect();
    for (i, _) in prompts.iter().enumerate() {
        runner.add_sequence(i as u64).unwrap();
    }
    let mut start: Vec<usize> = vec![0; prompts.len()];
    for _ in 0..steps {
        let chunks: Vec<SeqChunk> = seqs
            .iter()
            .enumerate()
            .map(|(i, s)| SeqChunk::new(i as u64, &s[start[i]..], start[i]))
            .collect();
        let logits = runner.step(&chunks).unwrap();
        for (i, l) in logits.iter().enumerate() {
            let lp = log_softmax(l);
            let t = argmax(&lp);
            start[i] = seqs[i].len();
            seqs[i].push(t);
            out[i].tokens.push(t);
            out[i].logprobs.push(lp[t as usize]);
            out[i].top.push(top5(&lp));
        }
    }
    for (i, _) in prompts.iter().enumerate() {
        runner.free_sequence(i as u64).unwrap();
    }
    out
}

fn import(state: &Path, family: &str) {
    let store = Store::new(state);
    let source = CheckpointSource::open(&fixture(family)).unwrap();
    let txn = store.begin(family).unwrap();
    write_pack(&source, family, txn.dir(), &|_| {}).unwrap();
    txn.commit().unwrap();
}

fn golden(family: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(family).join("golden.json")).unwrap()).unwrap()
}

fn prompt_ids(case: &Value) -> Vec<u32> {
    case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Checks one continuation against a golden case; returns the largest |Δlogprob|.
fn check(family: &str, case: &Value, got: &Continuation) -> f32 {
    let want: Vec<u32> = case["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(
        got.tokens, want,
        "{family}: greedy tokens differ for prompt {:?}",
        case["prompt"]
    );
    let mut worst = 0f32;
    for (step, entries) in case["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let lp = case["logprobs"][step].as_f64().unwrap() as f32;
        worst = worst.max((got.logprobs[step] - lp).abs());
        for (rank, e) in entries.as_array().unwrap().iter().enumerate() {
            let (id, lp) = (e[0].as_u64().unwrap() as u32, e[1].as_f64().unwrap() as f32);
            let (gid, glp) = got.top[step][rank];
            assert_eq!(gid, id, "{family}: step {step} rank {rank} token differs");
            worst = worst.max((glp - lp).abs());
        }
    }
    assert!(worst <= 1e-4, "{family}: |Δlogprob| {worst} > 1e-4");
    worst
}

#[test]
fn cpu_engine_matches_transformers_alone_batched_and_streaming() {
    let state = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        import(state.path(), family);
        let g = golden(family);
        let cases = g["cases"].as_array().unwrap();
        let prompts: Vec<Vec<u32>> = cases.iter().map(prompt_ids).collect();
        let steps = cases[0]["max_new_tokens"].as_u64().unwrap() as usize;
        let store = Store::new(state.path());

        let mut all = LoadedModel::open(&store, family, &LoadOptions::default()).unwrap();
        let mut alone = Vec::new();
        let mut worst = 0f32;
        for (case, p) in cases.iter().zip(&prompts) {
            let got = greedy_batch(&mut all, std::slice::from_ref(p), steps).remove(0);
            worst = worst.max(check(family, case, &got));
            alone.push(got);
        }
        // All prompts at once: each the same as alone.
        let batched = greedy_batch(&mut all, &prompts, steps);
        for (case, got) in cases.iter().zip(&batched) {
            check(family, case, got);
        }
        // The minimal slot budget (one layer's top-k) streams experts from experts.tiles and
        // must give bit-identical results.
        let top_k = all.manifest.spec.moe.top_k;
        let mut options = LoadOptions::default();
        options.tier.device_slots = Some(top_k);
        let mut small = LoadedModel::open(&store, family, &options).unwrap();
        for (p, want) in prompts.iter().zip(&alone) {
            let got = greedy_batch(&mut small, std::slice::from_ref(p), steps).remove(0);
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
