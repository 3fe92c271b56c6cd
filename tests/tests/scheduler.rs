//! Continuous batching on a golden fixture: jobs that join a running batch, prompts prefilled
//! in small chunks, cancellation and admission limits.

use std::sync::mpsc;

use serde_json::Value;
use tileflow_engine::model::{LoadOptions, LoadedModel};
use tileflow_engine::pack::import::CheckpointSource;
use tileflow_engine::pack::write::write_pack;
use tileflow_engine::sampler::SamplingParams;
use tileflow_engine::sched::{
    JobEvent, JobRequest, JobSink, Scheduler, SchedulerConfig, SubmitError,
};
use tileflow_engine::store::Store;
use tileflow_engine::tokenizer::TextTokenizer;
use tileflow_tests::fixture;

struct Sink {
    index: usize,
    tx: mpsc::Sender<(usize, JobEvent)>,
    /// Report the client gone after this many tokens.
    hang_up_after: Option<usize>,
    seen: usize,
}

impl JobSink for Sink {
    fn emit(&mut self, event: JobEvent) -> bool {
        if matches!(event, JobEvent::Token { .. }) {
            self.seen += 1;
        }
        let _ = self.tx.send((self.index, event));
        self.hang_up_after.is_none_or(|n| self.seen < n)
    }
}

fn open(family: &str) -> (tempfile::TempDir, LoadedModel, TextTokenizer, Value) {
    let state = tempfile::tempdir().unwrap();
    let store = Store::new(state.path());
    let source = CheckpointSource::open(&fixture(family)).unwrap();
    let txn = store.begin(family).unwrap();
    write_pack(&source, family, txn.dir(), &|_| {}).unwrap();
    txn.commit().unwrap();
    let model = LoadedModel::open(&store, family, &LoadOptions::default()).unwrap();
    let tokenizer = TextTokenizer::from_dir(&model.dir).unwrap();
    let golden =
        serde_json::from_slice(&std::fs::read(fixture(family).join("golden.json")).unwrap())
            .unwrap();
    (state, model, tokenizer, golden)
}

fn request(case: &Value) -> JobRequest {
    let prompt = case["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let mut params = SamplingParams::greedy(16);
    params.ignore_eos = true;
    params.logprobs = Some(5);
    JobRequest {
        prompt,
        params,
        deadline: None,
    }
}

/// Tokens and chosen logprobs per job, from the events.
fn collect(
    rx: &mpsc::Receiver<(usize, JobEvent)>,
    n: usize,
) -> Vec<(Vec<u32>, Vec<f32>, Option<&'static str>)> {
    let mut out = vec![(Vec::new(), Vec::new(), None); n];
    while let Ok((i, e)) = rx.try_recv() {
        match e {
            JobEvent::Token { id, logprob, .. } => {
                out[i].0.push(id);
                out[i].1.push(logprob);
            }
            JobEvent::Admitted => {}
            JobEvent::Done { finish_reason, .. } => out[i].2 = Some(finish_reason),
            JobEvent::Failed { message, .. } => panic!("job {i} failed: {message}"),
        }
    }
    out
}

#[test]
fn jobs_joining_a_running_batch_get_their_own_continuation() {
    let (_state, model, tokenizer, golden) = open("mixtral");
    let cases: Vec<&Value> = golden["cases"].as_array().unwrap().iter().collect();
    let config = SchedulerConfig {
        max_running: 3,
        max_waiting: 8,
        prefill_chunk: 5,
    };
    let mut sched = Scheduler::new(model.runner, tokenizer, config);
    let (tx, rx) = mpsc::channel();
    let sink = |index| {
        Box::new(Sink {
            index,
            tx: tx.clone(),
            hang_up_after: None,
            seen: 0,
        })
    };
    sched.submit(request(cases[2]), sink(0)).unwrap();
    for _ in 0..4 {
        sched.step();
    }
    sched.submit(request(cases[0]), sink(1)).unwrap();
    sched.step();
    sched.submit(request(cases[1]), sink(2)).unwrap();
    sched.submit(request(cases[3]), sink(3)).unwrap();
    while !sched.is_idle() {
        sched.step();
    }
    let got = collect(&rx, 4);
    for (i, case) in [cases[2], cases[0], cases[1], cases[3]].iter().enumerate() {
        let want: Vec<u32> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(got[i].0, want, "job {i}");
        for (step, lp) in got[i].1.iter().enumerate() {
            let w = case["logprobs"][step].as_f64().unwrap() as f32;
            assert!((lp - w).abs() <= 1e-4, "job {i} step {step}: {lp} vs {w}");
        }
        assert_eq!(got[i].2, Some("length"));
    }
    let kv = sched.runner().kv_cache();
    assert_eq!(kv.free_blocks(), kv.layout().num_blocks, "blocks leaked");
}

#[test]
fn cancellation_and_hang_up_free_capacity() {
    let (_state, model, tokenizer, golden) = open("olmoe");
    let case = &golden["cases"][0];
    let config = SchedulerConfig {
        max_running: 2,
        max_waiting: 2,
        prefill_chunk: 64,
    };
    let mut sched = Scheduler::new(model.runner, tokenizer, config);
    let (tx, rx) = mpsc::channel();
    let hang = Box::new(Sink {
        index: 0,
        tx: tx.clone(),
        hang_up_after: Some(3),
        seen: 0,
    });
    sched.submit(request(case), hang).unwrap();
    let id = sched
        .submit(
            request(case),
            Box::new(Sink {
                index: 1,
                tx: tx.clone(),
                hang_up_after: None,
                seen: 0,
            }),
        )
        .unwrap();
    for _ in 0..5 {
        sched.step();
    }
    sched.cancel(id);
    assert!(sched.is_idle(), "{sched:?}");
    let kv = sched.runner().kv_cache();
    assert_eq!(kv.free_blocks(), kv.layout().num_blocks);
    let got = collect(&rx, 2);
    assert_eq!(got[0].0.len(), 3, "the job whose client hung up kept going");
    assert_eq!(got[1].2, None, "a cancelled job reported done");
}

#[test]
fn admission_limits_are_clear_errors() {
    let (_state, model, tokenizer, golden) = open("olmoe");
    let case = &golden["cases"][0];
    let config = SchedulerConfig {
        max_running: 1,
        max_waiting: 1,
        prefill_chunk: 64,
    };
    let mut sched = Scheduler::new(model.runner, tokenizer, config);
    let (tx, _rx) = mpsc::channel();
    let sink = |index| {
        Box::new(Sink {
            index,
            tx: tx.clone(),
            hang_up_after: None,
            seen: 0,
        })
    };
    sched.submit(request(case), sink(0)).unwrap();
    assert!(matches!(
        sched.submit(request(case), sink(1)),
        Err(SubmitError::QueueFull(1))
    ));

    let mut long = request(case);
    long.params.max_tokens = 10_000;
    let e = sched.submit(long, sink(2)).unwrap_err();
    assert!(
        e.to_string().contains("exceeds the model's context of 256"),
        "{e}"
    );

    let mut bad = request(case);
    bad.prompt[3] = 100_000;
    let e = sched.submit(bad, sink(3)).unwrap_err();
    assert!(
        e.to_string().contains("token id 100000 at position 3"),
        "{e}"
    );

    let mut empty = request(case);
    empty.prompt.clear();
    assert!(matches!(
        sched.submit(empty, sink(4)),
        Err(SubmitError::EmptyPrompt)
    ));
}
