//! The CUDA backend against Hugging Face transformers' golden continuations, through the real
//! pack path (import → store → tier cache with VRAM slots over experts.tiles): the same greedy
//! tokens, alone and batched, and a minimal device slot budget (forcing every layer to stream
//! its experts through the host tier) giving the same tokens as all-resident.
//!
//! Runs where there is a GPU (the GPU host); elsewhere it says so and passes.
#![cfg(feature = "cuda")]

use std::sync::Arc;

use tileflow_engine::backend::Backend;
use tileflow_engine::model::LoadOptions;
use tileflow_engine::store::Store;
use tileflow_gpu::{open_model, CudaDevice};
use tileflow_tests::greedy::{greedy_batch, import_fixture};
use tileflow_tests::{golden_cases, FAMILIES};

/// f32 weights and activations on both sides; only the order of the sums differs.
const F32_LOGPROB_TOLERANCE: f64 = 1e-3;

fn device() -> Option<Arc<CudaDevice>> {
    match tileflow_gpu::probe() {
        Ok(gpus) if !gpus.is_empty() => Some(CudaDevice::open(0, None).unwrap()),
        other => {
            eprintln!("no GPU here ({other:?}): CUDA golden tests skipped");
            None
        }
    }
}

#[test]
fn cuda_engine_matches_transformers_alone_batched_and_streaming() {
    let Some(dev) = device() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    for family in FAMILIES {
        import_fixture(state.path(), family);
        let cases = golden_cases(family);
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
        let steps = cases[0].continuation.tokens.len();
        let store = Store::new(state.path());

        let mut all = open_model(&store, family, &LoadOptions::default(), &dev).unwrap();
        assert_eq!(all.runner.backend().name(), "cuda:0");
        let mut alone = Vec::new();
        let mut worst = 0f64;
        for (i, (case, p)) in cases.iter().zip(&prompts).enumerate() {
            let got = greedy_batch(&mut all.runner, std::slice::from_ref(p), steps).remove(0);
            let what = format!("{family} case {i} alone");
            worst = worst.max(got.assert_within(&case.continuation, &what, F32_LOGPROB_TOLERANCE));
            alone.push(got);
        }
        let batched = greedy_batch(&mut all.runner, &prompts, steps);
        for (i, (case, got)) in cases.iter().zip(&batched).enumerate() {
            let what = format!("{family} case {i} batched");
            worst = worst.max(got.assert_within(&case.continuation, &what, F32_LOGPROB_TOLERANCE));
        }

        let top_k = all.manifest.spec.moe.top_k;
        drop(all);
        let mut options = LoadOptions::default();
        options.tier.device_slots = Some(top_k);
        let mut small = open_model(&store, family, &options, &dev).unwrap();
        for (p, want) in prompts.iter().zip(&alone) {
            let got = greedy_batch(&mut small.runner, std::slice::from_ref(p), steps).remove(0);
            assert_eq!(
                got.tokens, want.tokens,
                "{family}: slot budget {top_k} changed the tokens"
            );
        }
        let stats = small.runner.experts().stats();
        assert!(
            stats.device_evictions > 0 && stats.h2d_bytes > 0,
            "{family}: the small budget never streamed: {stats:?}"
        );
        eprintln!("{family}: max |Δlogprob| {worst:.2e}; streaming run {stats:?}");
    }
}

/// Max |Δlogprob| over the whole vocabulary at each step of a teacher-forced run (the prompt,
/// then the golden tokens one at a time) on two runners.
fn stepwise<B1, P1, B2, P2>(
    a: &mut tileflow_engine::forward::ModelRunner<B1, P1>,
    b: &mut tileflow_engine::forward::ModelRunner<B2, P2>,
    prompt: &[u32],
    forced: &[u32],
) -> Vec<f32>
where
    B1: Backend,
    B2: Backend,
    P1: tileflow_engine::forward::ExpertProvider,
    P2: tileflow_engine::forward::ExpertProvider,
{
    use tileflow_engine::forward::SeqChunk;
    use tileflow_tests::engine_help::log_softmax;
    a.add_sequence(0).unwrap();
    b.add_sequence(0).unwrap();
    let mut out = Vec::new();
    let mut start = 0;
    let mut seq = prompt.to_vec();
    for &t in std::iter::once(&0).chain(forced) {
        if start > 0 {
            seq.push(t);
        }
        let chunk = [SeqChunk::new(0, &seq[start..], start)];
        let la = log_softmax(&a.step(&chunk).unwrap()[0]);
        let lb = log_softmax(&b.step(&chunk).unwrap()[0]);
        out.push(
            la.iter()
                .zip(&lb)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max),
        );
        start = seq.len();
    }
    a.free_sequence(0).unwrap();
    b.free_sequence(0).unwrap();
    out
}

#[test]
fn cuda_and_cpu_agree_at_every_step_of_every_golden_case() {
    let Some(dev) = device() else {
        return;
    };
    let state = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for family in FAMILIES {
        import_fixture(state.path(), family);
        let store = Store::new(state.path());
        let options = LoadOptions::default();
        let mut gpu = open_model(&store, family, &options, &dev).unwrap();
        let mut cpu = tileflow_engine::model::LoadedModel::open(&store, family, &options).unwrap();
        for (i, case) in golden_cases(family).iter().enumerate() {
            let forced = &case.continuation.tokens;
            let d = stepwise(&mut cpu.runner, &mut gpu.runner, &case.prompt_ids, forced);
            let worst = d.iter().copied().fold(0.0, f32::max);
            let d: Vec<String> = d.iter().map(|v| format!("{v:.0e}")).collect();
            eprintln!("{family} case {i}: max |Δlogprob| per step {}", d.join(" "));
            if f64::from(worst) > F32_LOGPROB_TOLERANCE {
                failures.push(format!("{family} case {i}: {worst:e}"));
            }
        }
    }
    assert!(failures.is_empty(), "CPU and CUDA disagree: {failures:?}");
}
