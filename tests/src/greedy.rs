//! Greedy decoding of golden prompts through an in-process engine on any backend, and the
//! comparison with transformers' golden continuations.

use std::path::Path;

use serde_json::Value;
use tileflow_engine::backend::Backend;
use tileflow_engine::forward::{ExpertProvider, ModelRunner, SeqChunk};
use tileflow_engine::pack::import::CheckpointSource;
use tileflow_engine::pack::write::write_pack;
use tileflow_engine::store::Store;

use crate::engine_help::{argmax, log_softmax};
use crate::fixture;

/// What a case produced: greedy tokens and, per step, the chosen token's logprob and the top 5.
#[derive(Debug, PartialEq)]
pub struct Greedy {
    /// The tokens chosen.
    pub tokens: Vec<u32>,
    /// The chosen token's logprob per step.
    pub logprobs: Vec<f32>,
    /// The five most likely (token, logprob) per step.
    pub top: Vec<Vec<(u32, f32)>>,
}

fn top5(lp: &[f32]) -> Vec<(u32, f32)> {
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    idx[..5].iter().map(|&i| (i as u32, lp[i])).collect()
}

/// Greedy-decodes every prompt together, one batched step at a time.
pub fn greedy_batch<B: Backend, P: ExpertProvider>(
    runner: &mut ModelRunner<B, P>,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Vec<Greedy> {
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out: Vec<Greedy> = prompts
        .iter()
        .map(|_| Greedy {
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

/// Imports the fixture checkpoint of `family` into a store at `state`.
pub fn import_fixture(state: &Path, family: &str) {
    let store = Store::new(state);
    let source = CheckpointSource::open(&fixture(family)).unwrap();
    let txn = store.begin(family).unwrap();
    write_pack(&source, family, txn.dir(), &|_| {}).unwrap();
    txn.commit().unwrap();
}

/// The prompt of a golden case.
pub fn prompt_ids(case: &Value) -> Vec<u32> {
    case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Checks one continuation against a golden case (same tokens, top-5 in the same order,
/// logprobs within `tolerance`); returns the largest |Δlogprob|.
pub fn check_golden(family: &str, case: &Value, got: &Greedy, tolerance: f32) -> f32 {
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
    assert!(
        worst <= tolerance,
        "{family}: |Δlogprob| {worst} > {tolerance}"
    );
    worst
}
