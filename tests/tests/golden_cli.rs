//! `tilectl run` end to end on the golden fixtures: our tokenizer and chat template give
//! transformers' prompt ids, and generation gives its greedy tokens and top-5 logprobs, alone,
//! batched, and with the minimal expert slot budget.

use serde_json::Value;
use tileflow_tests::{fixture, tilectl_ok, FAMILIES};

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// Compares one `choices[i]` of `tilectl run --json` with a golden case.
fn check(family: &str, case: &Value, got: &Value) {
    assert_eq!(
        ids(&got["prompt_ids"]),
        ids(&case["prompt_ids"]),
        "{family}: prompt ids differ"
    );
    assert_eq!(
        ids(&got["tokens"]),
        ids(&case["tokens"]),
        "{family}: greedy tokens differ"
    );
    let mut worst = 0f64;
    for (step, entries) in case["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let d = (got["logprobs"][step].as_f64().unwrap()
            - case["logprobs"][step].as_f64().unwrap())
        .abs();
        worst = worst.max(d);
        for (rank, e) in entries.as_array().unwrap().iter().enumerate() {
            let g = &got["top_logprobs"][step][rank];
            assert_eq!(g[0], e[0], "{family}: step {step} rank {rank}");
            worst = worst.max((g[1].as_f64().unwrap() - e[1].as_f64().unwrap()).abs());
        }
    }
    assert!(worst <= 1e-4, "{family}: |Δlogprob| {worst:.2e} > 1e-4");
}

fn run_json(state: &std::path::Path, args: &[&str]) -> Value {
    serde_json::from_str(&tilectl_ok(state, args).stdout).unwrap()
}

#[test]
fn tilectl_run_matches_transformers() {
    let state = tempfile::tempdir().unwrap();
    let s = state.path();
    for family in FAMILIES {
        tilectl_ok(
            s,
            &[
                "model",
                "import",
                fixture(family).to_str().unwrap(),
                "--name",
                family,
            ],
        );
        let golden: Value =
            serde_json::from_slice(&std::fs::read(fixture(family).join("golden.json")).unwrap())
                .unwrap();
        let cases = golden["cases"].as_array().unwrap();
        let common = [
            "--json",
            "--max-tokens",
            "16",
            "--ignore-eos",
            "--logprobs",
            "5",
        ];
        let mut text_prompts = Vec::new();
        for case in cases {
            let mut args = vec!["run", family];
            match case["prompt"].as_str() {
                Some(p) => {
                    args.extend(["--prompt", p]);
                    text_prompts.push(p);
                }
                None => {
                    let msg = case["chat_messages"][0]["content"].as_str().unwrap();
                    args.extend(["--chat", "--prompt", msg]);
                }
            }
            args.extend(common);
            let out = run_json(s, &args);
            check(family, case, &out["choices"][0]);
            // Streaming every expert through a budget of one layer's top-k slots: identical.
            args.extend(["--expert-slots", "2"]);
            let small = run_json(s, &args);
            assert_eq!(
                small["choices"], out["choices"],
                "{family}: expert slot budget changed the output"
            );
            assert!(small["expert_cache"]["evictions"].as_u64().unwrap() > 0);
            // Hybrid execution forced on: every device-tier miss found in the host tier runs
            // on the CPU kernels from its host slot (sums in another order: the golden
            // tokens and logprobs within the tolerance, not the bytes of the run above).
            args.extend(["--cpu-experts", "always"]);
            let hybrid = run_json(s, &args);
            check(family, case, &hybrid["choices"][0]);
            let ran_on_cpu = hybrid["expert_cache"]["ran_on_cpu"].as_u64().unwrap();
            assert!(
                ran_on_cpu > 0,
                "{family}: no expert ran on the CPU: {hybrid}"
            );
            assert!(hybrid["expert_cache"]["ran_on_device"].as_u64().unwrap() > 0);
        }
        // All text prompts as one batch.
        let mut args = vec!["run", family];
        for p in &text_prompts {
            args.extend(["--prompt", p]);
        }
        args.extend(common);
        let out = run_json(s, &args);
        let text_cases: Vec<&Value> = cases.iter().filter(|c| c["prompt"].is_string()).collect();
        for (i, case) in text_cases.iter().enumerate() {
            check(family, case, &out["choices"][i]);
        }
    }
}

#[test]
fn demo_runs_offline_on_a_synthesized_model() {
    let state = tempfile::tempdir().unwrap();
    let run = tilectl_ok(state.path(), &["demo", "--max-tokens", "8"]);
    assert!(
        run.stderr.contains("synthesizing the `tiny` model"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("tokens/s"), "{}", run.stderr);
    // The second run reuses the stored model.
    let again = tilectl_ok(state.path(), &["demo", "--max-tokens", "8", "--json"]);
    assert!(!again.stderr.contains("synthesizing"));
    let out: Value = serde_json::from_str(&again.stdout).unwrap();
    assert_eq!(out["choices"][0]["tokens"].as_array().unwrap().len(), 8);
}
