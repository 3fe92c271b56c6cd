//! The real `tileflowd` against transformers' golden continuations, over the Unix socket:
//! token-id and text prompts, chat, `return_tokens_as_token_ids`, `echo`, and 32 concurrent
//! clients that each get exactly the continuation they get alone.

use std::sync::{Arc, Barrier};

use serde_json::{json, Value};
use tileflow_tests::{
    golden_cases, token_id, Continuation, Daemon, UdsClient, FAMILIES, LOGPROB_TOLERANCE,
};

/// A greedy completion request for token ids, with top-5 logprobs rendered as ids.
fn greedy_ids(model: &str, prompt: &[u32], max_tokens: usize) -> Value {
    json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": true,
        "logprobs": 5,
        "return_tokens_as_token_ids": true,
    })
}

fn complete(client: &UdsClient, body: &Value) -> Value {
    let r = client.post_json("/v1/completions", body);
    assert_eq!(r.status, 200, "{body}: {}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "{body}: content type"
    );
    r.json()
}

#[test]
fn token_id_prompts_reproduce_transformers() {
    let daemon = Daemon::start(&FAMILIES);
    let client = daemon.client();
    for family in FAMILIES {
        for (i, case) in golden_cases(family).iter().enumerate() {
            let what = format!("{family} case {i}");
            let out = complete(&client, &greedy_ids(family, &case.prompt_ids, 16));
            assert_eq!(out["object"], "text_completion", "{what}");
            assert_eq!(out["model"], family, "{what}");
            let choice = &out["choices"][0];
            Continuation::from_completion_choice(choice, 0)
                .assert_matches(&case.continuation, &what);
            assert_eq!(choice["text"], case.text.as_str(), "{what}: text");
            assert_eq!(choice["finish_reason"], "length", "{what}");
            assert_eq!(
                out["usage"],
                json!({
                    "prompt_tokens": case.prompt_ids.len(),
                    "completion_tokens": 16,
                    "total_tokens": case.prompt_ids.len() + 16,
                }),
                "{what}: usage"
            );
        }
    }
}

#[test]
fn text_prompts_and_chat_reproduce_transformers() {
    let daemon = Daemon::start(&FAMILIES);
    let client = daemon.client();
    for family in FAMILIES {
        for (i, case) in golden_cases(family).iter().enumerate() {
            let what = format!("{family} case {i}");
            if let Some(prompt) = &case.prompt {
                let mut body = greedy_ids(family, &[], 16);
                body["prompt"] = json!(prompt);
                let out = complete(&client, &body);
                Continuation::from_completion_choice(&out["choices"][0], 0)
                    .assert_matches(&case.continuation, &what);
                assert_eq!(
                    out["usage"]["prompt_tokens"],
                    case.prompt_ids.len(),
                    "{what}: our tokenizer's prompt length"
                );
                continue;
            }
            // A chat case: the model's template, rendered by the daemon.
            let messages = case.chat_messages.clone().expect("a chat case");
            let body = json!({
                "model": family,
                "messages": messages,
                "max_tokens": 16,
                "temperature": 0,
                "ignore_eos": true,
                "logprobs": true,
                "top_logprobs": 5,
            });
            let r = client.post_json("/v1/chat/completions", &body);
            assert_eq!(r.status, 200, "{what}: {}", r.text());
            let out = r.json();
            assert_eq!(out["object"], "chat.completion", "{what}");
            let choice = &out["choices"][0];
            assert_eq!(choice["message"]["role"], "assistant", "{what}");
            assert_eq!(choice["message"]["content"], case.text.as_str(), "{what}");
            assert_eq!(choice["finish_reason"], "length", "{what}");
            assert_eq!(
                out["usage"]["prompt_tokens"],
                case.prompt_ids.len(),
                "{what}: the chat template's prompt length"
            );
            // Chat logprobs name tokens by text: compare the values, rank by rank.
            let content = choice["logprobs"]["content"].as_array().expect("logprobs");
            assert_eq!(content.len(), 16, "{what}");
            for (step, entry) in content.iter().enumerate() {
                let lp = entry["logprob"].as_f64().unwrap_or(f64::NAN);
                let want = case.continuation.logprobs[step];
                assert!(
                    (lp - want).abs() <= LOGPROB_TOLERANCE,
                    "{what}: step {step}: {lp} vs {want}"
                );
                let mut top: Vec<f64> = entry["top_logprobs"]
                    .as_array()
                    .expect("top_logprobs")
                    .iter()
                    .map(|t| t["logprob"].as_f64().unwrap_or(f64::NAN))
                    .collect();
                top.sort_by(|a, b| b.total_cmp(a));
                let want: Vec<f64> = case.continuation.top[step].iter().map(|t| t.1).collect();
                assert_eq!(top.len(), want.len(), "{what}: step {step}");
                for (g, w) in top.iter().zip(&want) {
                    assert!(
                        (g - w).abs() <= LOGPROB_TOLERANCE,
                        "{what}: step {step}: top {top:?} vs {want:?}"
                    );
                }
                let bytes: Vec<u8> = entry["bytes"]
                    .as_array()
                    .expect("bytes")
                    .iter()
                    .map(|b| {
                        b.as_u64()
                            .and_then(|b| u8::try_from(b).ok())
                            .expect("a byte")
                    })
                    .collect();
                assert_eq!(
                    bytes,
                    entry["token"].as_str().unwrap_or_default().as_bytes(),
                    "{what}: bytes of the token"
                );
            }
        }
    }
}

#[test]
fn token_ids_as_keys_and_echo() {
    let family = "mixtral";
    let daemon = Daemon::start(&[family]);
    let client = daemon.client();
    let cases = golden_cases(family);
    let case = &cases[0];
    let prompt_text = case.prompt.clone().expect("a text case");
    let p = case.prompt_ids.len();

    let as_ids = complete(&client, &greedy_ids(family, &case.prompt_ids, 16));
    let mut body = greedy_ids(family, &case.prompt_ids, 16);
    body["return_tokens_as_token_ids"] = json!(false);
    let as_text = complete(&client, &body);
    let (ids_lp, text_lp) = (
        &as_ids["choices"][0]["logprobs"],
        &as_text["choices"][0]["logprobs"],
    );
    for (step, key) in ids_lp["tokens"].as_array().unwrap().iter().enumerate() {
        let key = key.as_str().unwrap();
        assert_eq!(token_id(key), case.continuation.tokens[step]);
        let top = ids_lp["top_logprobs"][step].as_object().unwrap();
        assert_eq!(top.len(), 5, "step {step}: {top:?}");
        assert!(top.keys().all(|k| k.starts_with("token_id:")), "{top:?}");
    }
    for key in text_lp["tokens"].as_array().unwrap() {
        assert!(!key.as_str().unwrap().starts_with("token_id:"), "{key}");
    }
    // Only the rendering of the tokens changes.
    assert_eq!(ids_lp["token_logprobs"], text_lp["token_logprobs"]);
    assert_eq!(ids_lp["text_offset"], text_lp["text_offset"]);
    assert_eq!(as_ids["choices"][0]["text"], as_text["choices"][0]["text"]);

    // echo: the prompt comes first, in the text and in the logprobs (without logprobs of its own).
    let mut echo_offsets = Vec::new();
    for as_ids in [true, false] {
        let mut body = greedy_ids(family, &case.prompt_ids, 16);
        body["echo"] = json!(true);
        body["return_tokens_as_token_ids"] = json!(as_ids);
        let out = complete(&client, &body);
        let choice = &out["choices"][0];
        assert_eq!(
            choice["text"].as_str().unwrap(),
            format!("{prompt_text}{}", case.text),
            "echo prepends the prompt"
        );
        let lp = &choice["logprobs"];
        assert_eq!(lp["tokens"].as_array().unwrap().len(), p + 16);
        for i in 0..p {
            assert!(lp["token_logprobs"][i].is_null(), "prompt token {i}: {lp}");
            assert!(lp["top_logprobs"][i].is_null(), "prompt token {i}: {lp}");
        }
        let offsets: Vec<u64> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap())
            .collect();
        assert_eq!(offsets[0], 0);
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
        assert_eq!(
            offsets[p],
            prompt_text.len() as u64,
            "the first generated token starts after the echoed prompt: {offsets:?}"
        );
        if as_ids {
            let echoed: Vec<u32> = lp["tokens"].as_array().unwrap()[..p]
                .iter()
                .map(|k| token_id(k.as_str().unwrap()))
                .collect();
            assert_eq!(echoed, case.prompt_ids);
            Continuation::from_completion_choice(choice, p)
                .assert_matches(&case.continuation, "echo");
        }
        assert_eq!(out["usage"]["prompt_tokens"], p);
        assert_eq!(out["usage"]["completion_tokens"], 16);
        echo_offsets.push(offsets);
    }
    assert_eq!(
        echo_offsets[0], echo_offsets[1],
        "offsets count bytes of text, however tokens are rendered"
    );

    // A text prompt echoes as it was sent.
    let mut body = greedy_ids(family, &[], 4);
    body["prompt"] = json!(prompt_text);
    body["echo"] = json!(true);
    let out = complete(&client, &body);
    assert!(
        out["choices"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with(&prompt_text),
        "{out}"
    );
}

/// One request of the concurrency test and the golden continuation it must produce.
struct Job {
    model: &'static str,
    prompt: Vec<u32>,
    expected: Continuation,
    stream: bool,
}

/// 32 distinct requests with golden answers: each case as it is, and each case again with a
/// prefix of its golden continuation appended to the prompt (so it must continue from there).
fn jobs() -> Vec<Job> {
    let mut jobs = Vec::new();
    for (f, family) in FAMILIES.into_iter().enumerate() {
        for (i, case) in golden_cases(family).into_iter().enumerate() {
            let c = &case.continuation;
            let k = 1 + (3 * f + 5 * i) % 12;
            let mut longer = case.prompt_ids.clone();
            longer.extend(&c.tokens[..k]);
            let rest = Continuation {
                tokens: c.tokens[k..].to_vec(),
                logprobs: c.logprobs[k..].to_vec(),
                top: c.top[k..].to_vec(),
            };
            jobs.push(Job {
                model: family,
                prompt: case.prompt_ids.clone(),
                expected: case.continuation.clone(),
                stream: jobs.len() % 2 == 1,
            });
            jobs.push(Job {
                model: family,
                prompt: longer,
                expected: rest,
                stream: jobs.len() % 2 == 1,
            });
        }
    }
    jobs
}

/// Runs one job, streamed or not, and returns what it generated.
fn run(client: &UdsClient, job: &Job) -> Continuation {
    let mut body = greedy_ids(job.model, &job.prompt, job.expected.tokens.len());
    if !job.stream {
        let out = complete(client, &body);
        return Continuation::from_completion_choice(&out["choices"][0], 0);
    }
    body["stream"] = json!(true);
    let mut events = client
        .stream_json("/v1/completions", &body)
        .unwrap_or_else(|e| panic!("{body}: {e}"));
    assert_eq!(events.status, 200);
    let mut got = Continuation::default();
    let mut done = false;
    for data in events.by_ref() {
        if data == "[DONE]" {
            done = true;
            break;
        }
        let chunk: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{data}: {e}"));
        let lp = &chunk["choices"][0]["logprobs"];
        if lp.is_null() {
            continue;
        }
        let part = Continuation::from_completion_choice(&chunk["choices"][0], 0);
        got.tokens.extend(part.tokens);
        got.logprobs.extend(part.logprobs);
        got.top.extend(part.top);
    }
    assert!(done, "{body}: the stream ended without [DONE]");
    got
}

#[test]
fn concurrent_clients_each_get_their_own_continuation() {
    let daemon = Daemon::start(&FAMILIES);
    let jobs = Arc::new(jobs());
    assert_eq!(jobs.len(), 32);
    let client = daemon.client();
    // Alone, one after the other.
    let alone: Vec<Continuation> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| {
            let got = run(&client, job);
            got.assert_matches(&job.expected, &format!("job {i} ({}) alone", job.model));
            got
        })
        .collect();
    // All at once.
    let barrier = Arc::new(Barrier::new(jobs.len()));
    let threads: Vec<_> = (0..jobs.len())
        .map(|i| {
            let (jobs, barrier, client) = (jobs.clone(), barrier.clone(), client.clone());
            std::thread::spawn(move || {
                barrier.wait();
                run(&client, &jobs[i])
            })
        })
        .collect();
    for (i, t) in threads.into_iter().enumerate() {
        let together = t.join().unwrap_or_else(|_| panic!("client {i} panicked"));
        let what = format!("job {i} ({}) among 32 clients", jobs[i].model);
        together.assert_matches(&alone[i], &what);
        together.assert_matches(&jobs[i].expected, &what);
    }
    let status = daemon.status();
    for m in status["models"].as_array().unwrap() {
        assert_eq!(m["running"], 0, "{m}");
        assert_eq!(m["kv_free_blocks"], m["kv_blocks"], "{m}");
    }
}

#[test]
fn stop_token_ids_and_stop_strings_end_the_continuation() {
    let family = "mixtral";
    let daemon = Daemon::start(&[family]);
    let client = daemon.client();
    let case = &golden_cases(family)[0];
    let tokens = &case.continuation.tokens;

    // A stop token id: generation ends at its first occurrence, which usage counts.
    let stop_id = tokens[5];
    let at = tokens.iter().position(|&t| t == stop_id).unwrap_or(5);
    let mut body = greedy_ids(family, &case.prompt_ids, 16);
    body["stop_token_ids"] = json!([stop_id]);
    let out = complete(&client, &body);
    let choice = &out["choices"][0];
    assert_eq!(choice["finish_reason"], "stop", "{out}");
    assert_eq!(out["usage"]["completion_tokens"], at + 1, "{out}");
    let got = Continuation::from_completion_choice(choice, 0);
    assert_eq!(got.tokens, tokens[..=at], "{out}");

    // A stop string: the text ends right before it.
    let chars: Vec<char> = case.text.chars().collect();
    let stop: String = chars[chars.len() - 2..].iter().collect();
    let before = &case.text[..case.text.find(&stop).unwrap_or_default()];
    let mut body = greedy_ids(family, &case.prompt_ids, 16);
    body["stop"] = json!(stop);
    let out = complete(&client, &body);
    assert_eq!(out["choices"][0]["finish_reason"], "stop", "{out}");
    assert_eq!(out["choices"][0]["text"], before, "stop {stop:?}: {out}");
}
