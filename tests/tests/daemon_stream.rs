//! Streaming over the socket: SSE framing of both endpoints, and cancellation when the client
//! goes away (its KV blocks are freed and its batch slot reused).

use std::time::Duration;

use serde_json::{json, Value};
use tileflow_tests::{parse_metrics, Daemon, SseEvent, SseStream, UdsClient};

const MODEL: &str = "qwen3_moe";

/// Reads a whole stream and checks its framing: every event is exactly one `data: <payload>`
/// line (the reader splits events at blank lines, so `\n\n` ends each), the last payload is
/// `[DONE]` and nothing follows it. Returns the JSON payloads before `[DONE]`.
fn framed_chunks(mut stream: SseStream, what: &str) -> Vec<Value> {
    assert_eq!(stream.status, 200, "{what}");
    assert_eq!(
        stream.header("content-type"),
        Some("text/event-stream"),
        "{what}"
    );
    let events: Vec<SseEvent> = stream
        .collect_events()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let (last, chunks) = events
        .split_last()
        .unwrap_or_else(|| panic!("{what}: no events"));
    assert_eq!(last.lines, ["data: [DONE]"], "{what}: the last event");
    chunks
        .iter()
        .map(|e| {
            assert_eq!(e.lines.len(), 1, "{what}: one line per event: {e:?}");
            let line = &e.lines[0];
            let payload = line
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("{what}: not a `data: ` line: {line:?}"));
            serde_json::from_str(payload).unwrap_or_else(|err| panic!("{what}: {line:?}: {err}"))
        })
        .collect()
}

fn completion(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": MODEL,
        "prompt": "The quick brown fox",
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": true,
        "logprobs": 2,
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn chat(stream: bool, include_usage: bool) -> Value {
    let mut body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 24,
        "temperature": 0,
        "ignore_eos": true,
        "stream": stream,
    });
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn open(client: &UdsClient, path: &str, body: &Value) -> SseStream {
    client
        .stream_json(path, body)
        .unwrap_or_else(|e| panic!("{path} {body}: {e}"))
}

#[test]
fn completion_stream_framing() {
    let daemon = Daemon::start(&[MODEL]);
    let client = daemon.client();
    let whole = client.post_json("/v1/completions", &completion(false, false));
    assert_eq!(whole.status, 200, "{}", whole.text());
    let whole = whole.json();
    for include_usage in [false, true] {
        let what = format!("completion stream, include_usage {include_usage}");
        let chunks = framed_chunks(
            open(&client, "/v1/completions", &completion(true, include_usage)),
            &what,
        );
        let mut text = String::new();
        let mut finish = Vec::new();
        let mut tokens = 0;
        let (body, usage) = if include_usage {
            let (u, b) = chunks.split_last().expect("a usage chunk");
            (b, Some(u))
        } else {
            (chunks.as_slice(), None)
        };
        for c in body {
            assert_eq!(c["object"], "text_completion", "{what}: {c}");
            assert_eq!(c["id"], chunks[0]["id"], "{what}: one id per stream");
            assert_eq!(c["model"], MODEL, "{what}");
            assert!(c["usage"].is_null(), "{what}: usage only at the end: {c}");
            let choice = &c["choices"][0];
            text.push_str(choice["text"].as_str().expect("text"));
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish.push(reason.to_string());
            }
            if let Some(lp) = choice["logprobs"]["tokens"].as_array() {
                tokens += lp.len();
            }
        }
        assert_eq!(
            text,
            whole["choices"][0]["text"].as_str().unwrap(),
            "{what}"
        );
        assert_eq!(finish, ["length"], "{what}: one finish reason");
        assert_eq!(
            body.last().unwrap()["choices"][0]["finish_reason"],
            "length",
            "{what}: the finish reason comes last"
        );
        assert_eq!(tokens, 24, "{what}: one logprobs entry per token");
        if let Some(u) = usage {
            assert_eq!(u["object"], "text_completion", "{what}");
            assert_eq!(u["choices"], json!([]), "{what}: {u}");
            assert_eq!(u["usage"], whole["usage"], "{what}");
        }
    }
    // echo streams the prompt first.
    let mut body = completion(true, false);
    body["echo"] = json!(true);
    let chunks = framed_chunks(open(&client, "/v1/completions", &body), "echo stream");
    assert_eq!(chunks[0]["choices"][0]["text"], "The quick brown fox");
}

#[test]
fn chat_stream_framing() {
    let daemon = Daemon::start(&[MODEL]);
    let client = daemon.client();
    let whole = client.post_json("/v1/chat/completions", &chat(false, false));
    assert_eq!(whole.status, 200, "{}", whole.text());
    let whole = whole.json();
    for include_usage in [false, true] {
        let what = format!("chat stream, include_usage {include_usage}");
        let chunks = framed_chunks(
            open(&client, "/v1/chat/completions", &chat(true, include_usage)),
            &what,
        );
        let (body, usage) = if include_usage {
            let (u, b) = chunks.split_last().expect("a usage chunk");
            (b, Some(u))
        } else {
            (chunks.as_slice(), None)
        };
        assert_eq!(
            body[0]["choices"][0]["delta"]["role"], "assistant",
            "{what}: the first delta names the role"
        );
        let mut content = String::new();
        let mut finish = Vec::new();
        for c in body {
            assert_eq!(c["object"], "chat.completion.chunk", "{what}: {c}");
            assert_eq!(c["id"], chunks[0]["id"], "{what}: one id per stream");
            assert!(c["usage"].is_null(), "{what}: {c}");
            let choice = &c["choices"][0];
            assert!(
                choice.get("message").is_none(),
                "{what}: chunks carry deltas: {c}"
            );
            if let Some(t) = choice["delta"]["content"].as_str() {
                content.push_str(t);
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish.push(reason.to_string());
            }
        }
        assert_eq!(
            content,
            whole["choices"][0]["message"]["content"].as_str().unwrap(),
            "{what}"
        );
        assert_eq!(finish, ["length"], "{what}");
        if let Some(u) = usage {
            assert_eq!(u["object"], "chat.completion.chunk", "{what}");
            assert_eq!(u["choices"], json!([]), "{what}");
            assert_eq!(u["usage"], whole["usage"], "{what}");
        }
    }
}

/// Requests finished with `finish_reason="cancelled"`, from /metrics.
fn cancelled(client: &UdsClient) -> f64 {
    let text = client.get("/metrics").text();
    parse_metrics(&text)
        .into_iter()
        .filter(|(k, _)| {
            k.starts_with("tileflow_requests_total{") && k.contains("finish_reason=\"cancelled\"")
        })
        .map(|(_, v)| v)
        .sum()
}

/// Waits until no job runs or waits and every KV block is free again.
fn wait_idle(daemon: &Daemon) -> Value {
    let mut last = Value::Null;
    daemon.wait_until(
        "running and waiting are 0 and every KV block is free",
        Duration::from_secs(60),
        || {
            last = daemon.model_status(MODEL);
            last["running"] == 0
                && last["waiting"] == 0
                && last["kv_free_blocks"] == last["kv_blocks"]
        },
    );
    last
}

/// Long requests (context 256: 8 + 240 tokens) that a dropped connection must cut short.
fn long_request(i: u32, stream: bool) -> Value {
    json!({
        "model": MODEL,
        "prompt": [1 + i, 2, 3, 4, 5, 6, 7, 8],
        "max_tokens": 240,
        "ignore_eos": true,
        "temperature": 0,
        "logprobs": 20,
        "stream": stream,
    })
}

#[test]
fn a_dropped_stream_frees_its_capacity() {
    let daemon = Daemon::start(&[MODEL]);
    let client = daemon.client();
    let idle = wait_idle(&daemon);
    assert!(idle["kv_blocks"].as_u64().unwrap() > 0, "{idle}");
    // The engine is fast next to a client's reads, so a full batch of long streams is started
    // and all are dropped after two events; if a machine hiccup let them all finish anyway,
    // try again (a bounded number of times).
    let mut attempts = 0;
    loop {
        attempts += 1;
        let before = cancelled(&client);
        let mut streams: Vec<SseStream> = (0..32)
            .map(|i| open(&client, "/v1/completions", &long_request(i, true)))
            .collect();
        for s in &mut streams {
            assert_eq!(s.status, 200);
            for _ in 0..2 {
                let data = s.next_data().expect("an event");
                let chunk: Value = serde_json::from_str(&data).expect("a JSON chunk");
                assert_eq!(chunk["object"], "text_completion");
            }
        }
        drop(streams);
        wait_idle(&daemon);
        let mut after = before;
        daemon.wait_until("cancellations are counted", Duration::from_secs(10), || {
            after = cancelled(&client);
            after > before
        });
        if after > before || attempts == 3 {
            assert!(
                after > before,
                "no stream was cancelled in {attempts} attempts"
            );
            break;
        }
    }
    // The freed capacity serves new work.
    let r = client.post_json("/v1/completions", &completion(false, false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 24);
}

/// `tileflow_generation_tokens_total`.
fn generated(client: &UdsClient) -> f64 {
    let text = client.get("/metrics").text();
    parse_metrics(&text)
        .into_iter()
        .find(|(k, _)| k == "tileflow_generation_tokens_total")
        .map_or(0.0, |(_, v)| v)
}

#[test]
fn a_dropped_non_streamed_request_frees_its_capacity() {
    use std::io::Write;
    let daemon = Daemon::start(&[MODEL]);
    let client = daemon.client();
    let socket = daemon.socket().to_path_buf();
    // Whole requests for 32 * 240 tokens; the clients hang up once the engine runs them.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let before = generated(&client);
        let conns: Vec<_> = (0..32)
            .map(|i| {
                let body = long_request(i, false).to_string();
                let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
                write!(
                    s,
                    "POST /v1/completions HTTP/1.1\r\nHost: t\r\n\
                     Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .expect("write");
                s
            })
            .collect();
        daemon.wait_until("the requests run", Duration::from_secs(60), || {
            daemon.model_status(MODEL)["running"] != 0 || generated(&client) > before
        });
        drop(conns);
        wait_idle(&daemon);
        let spent = generated(&client) - before;
        if spent < 32.0 * 240.0 || attempts == 3 {
            assert!(
                spent < 32.0 * 240.0,
                "requests whose clients hung up ran to the end ({spent} tokens, {attempts} tries)"
            );
            eprintln!("32 hung-up requests of 240 tokens generated {spent} tokens in all");
            break;
        }
    }
    let r = client.post_json("/v1/completions", &completion(false, false));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 24);
}
