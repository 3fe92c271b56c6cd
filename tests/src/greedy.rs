//! Greedy decoding of golden prompts through an in-process engine on any backend, as
//! [`Continuation`]s to compare with transformers' golden ones.

use std::path::Path;

use tileflow_engine::backend::Backend;
use tileflow_engine::forward::{ExpertProvider, ModelRunner, SeqChunk};
use tileflow_engine::pack::import::CheckpointSource;
use tileflow_engine::pack::write::write_pack;
use tileflow_engine::store::Store;

use crate::engine_help::{argmax, log_softmax};
use crate::{fixture, Continuation};

fn top5(lp: &[f32]) -> Vec<(u32, f64)> {
    let mut idx: Vec<usize> = (0..lp.len()).collect();
    idx.sort_by(|&a, &b| lp[b].total_cmp(&lp[a]).then(a.cmp(&b)));
    idx[..5]
        .iter()
        .map(|&i| (i as u32, f64::from(lp[i])))
        .collect()
}

/// Greedy-decodes every prompt together, one batched step at a time.
pub fn greedy_batch<B: Backend, P: ExpertProvider>(
    runner: &mut ModelRunner<B, P>,
    prompts: &[Vec<u32>],
    steps: usize,
) -> Vec<Continuation> {
    let mut seqs: Vec<Vec<u32>> = prompts.to_vec();
    let mut out = vec![Continuation::default(); prompts.len()];
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
            out[i].logprobs.push(f64::from(lp[t as usize]));
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
